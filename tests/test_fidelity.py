"""Fidelity measures on real vLLM streams (tiny random model, CPU, float32, a short synthetic stream):
the metrics are shares and distances that behave as they must: a lossless system reads all of full
attention's mass and reproduces its distributions, a sliding window reads less, and the plain-PyTorch
recomputation agrees with what vLLM decoded."""

from __future__ import annotations

import pytest

from helpers import live_engine
from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.eval.fidelity import LOSSLESS, QUESTIONS, SYSTEMS, System, format_table, measure, plot
from vllm_livevlm.eval.fixtures import synthetic_frames
from vllm_livevlm.eval.question_forward import QuestionForward

pytestmark = pytest.mark.slow

FRAMES = 24


@pytest.fixture(scope="module")
def data(tiny_model_dir):
    livevlm = {"long_term_budget_tokens": 640, "page_tokens": 32, "retrieve_ratio": 0.5}
    systems = [System("lossless", LOSSLESS), System("livevlm", livevlm), System("livevlm-read4", livevlm, read_frames=4),
               SYSTEMS["sliding-window"], System("uniform-8", LOSSLESS, 8)]
    for lv in live_engine(tiny_model_dir, {"clip_frames": 4}):
        return measure(lv, QuestionForward(tiny_model_dir), synthetic_frames(0, FRAMES, fps=1), list(QUESTIONS[:2]),
                       systems, answer_tokens=8, progress=lambda _: None)


def test_metrics_are_shares_and_distances(data):
    for name, s in data["systems"].items():
        for value in [s["attention_recall"], s["top1_agreement"], s["token_share"], *s["recall_per_layer"]]:
            assert 0.0 <= value <= 1.0 + 1e-6, name
        assert s["kl"] >= -1e-6, name


def test_recomputation_matches_vllm(data):
    # Teacher-forced greedy over the lossless memory reproduces vLLM's answer, and each system's first
    # token (which depends only on its context) equals the one vLLM decoded from that context.
    assert data["reference_check"] == 1.0
    for name, s in data["systems"].items():
        assert s["first_token_matches_vllm"] == 1.0, name


def test_lossless_is_full_attention(data):
    lossless = data["systems"]["lossless"]
    assert lossless["attention_recall"] == pytest.approx(1.0, abs=1e-6)
    assert lossless["token_share"] == 1.0
    assert lossless["top1_agreement"] == 1.0
    assert lossless["kl"] == pytest.approx(0.0, abs=1e-4)


def test_compressed_systems_read_less(data):
    systems = data["systems"]
    window = systems["sliding-window"]
    assert window["attention_recall"] < systems["livevlm"]["attention_recall"] < 1.0 - 1e-4
    assert window["token_share"] < systems["livevlm"]["token_share"] < 1.0
    assert systems["uniform-8"]["token_share"] == pytest.approx(8 / FRAMES, abs=0.01)
    assert window["kl"] > 1e-4


def test_a_matched_read_budget_reads_that_many_frames(data):
    # livevlm-read4's retrieve_ratio is derived so a question reads 4 frames' worth of stream tokens
    # (long-term pages + short-term frames), up to page rounding.
    systems = data["systems"]
    assert data["configs"]["livevlm-read4"]["retrieve_ratio"] != 0.5
    assert systems["livevlm-read4"]["token_share"] == pytest.approx(4 / FRAMES, abs=0.04)


def test_read_budget_resolution():
    config = LiveVLMConfig()  # M = 12000, 2 short-term frames
    system = System("x", {}, read_frames=32).resolved(config, tokens_per_frame=196)
    assert system.config["retrieve_ratio"] == pytest.approx(30 * 196 / 12000)
    assert System("x", {}, read_frames=10_000).resolved(config, 196).config["retrieve_ratio"] == 1.0
    with pytest.raises(ValueError, match="bounded"):
        System("x", {"long_term_budget_tokens": None}, read_frames=32).resolved(config, 196)


def test_table_and_plot(data, tmp_path):
    table = format_table(data)
    for name in data["systems"]:
        assert name in table
    data["args"] = {"frames": FRAMES, "model": "tiny"}
    plot(data, str(tmp_path / "fidelity.png"))
    assert (tmp_path / "fidelity.png").stat().st_size > 1000
