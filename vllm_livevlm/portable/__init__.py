"""Portable streams: a stream's whole state as one file (`format`), so it can move between processes."""

from vllm_livevlm.portable.format import FORMAT_VERSION, StreamFileError, decode_stream, encode_stream

__all__ = ["FORMAT_VERSION", "StreamFileError", "decode_stream", "encode_stream"]
