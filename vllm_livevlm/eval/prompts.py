"""The benchmarks' own prompt texts, word for word (typos included): what their evaluation code sends.

OVO-Bench's templates are indented triple-quoted strings in `utils/OVOBench.py`; they are kept line by line
without the source indentation. StreamingBench's are `PROMPT_TEMPLATE` of `src/benchmark/StreamingBench.py`
and `StreamingBenchSQA.py`; Video-MME's the frames-only prompt of its release (as lmms-eval documents it);
MLVU's and EgoSchema's ReKV's `format_mcqa_prompt`.
"""

from __future__ import annotations

from vllm_livevlm.eval.records import LETTERS

DO_NOT = "Do not include any additional text or explanation in your response."
OVO_MC = ("Question: {question}\nOptions:\n{options}\n"
          "Respond only with the letter corresponding to your chosen option (e.g., A, B, C).\n" + DO_NOT)
OVO_REC = ("You're watching a video in which people may perform a certain type of action repetively.\n"
           "The person performing this kind of action are referred to as 'they' in the following statement.\n"
           "You're task is to count how many times have different people in the video perform this kind of action "
           "in total.\nOne complete motion counts as one.\n"
           "Now, answer the following question: How many times did they {activity}?\n"
           "Provide your answer as a single number (e.g., 0, 1, 2, 3…) indicating the total count.\n" + DO_NOT)
OVO_SSR = ("You're watching a tutorial video which contain a sequential of steps.\n"
           "The following is one step from the whole procedures:\n{step}\n"
           "Your task is to determine if the man or woman in the video is currently performing this step.\n"
           "Answer only with “Yes” or “No”.\n" + DO_NOT)
OVO_CRR = ("You're responsible of answering questions based on the video content.\n"
           "The following question are relevant to the latest frames, i.e. the end of the video.\n{question}\n"
           "Decide whether existing visual content, especially latest frames, i.e. frames that near the end of the "
           "video, provide enough information for answering the question.\nAnswer only with “Yes” or “No”.\n" + DO_NOT)

SB = ("You are an advanced video question-answering AI assistant. You have been provided with some frames from the "
      "video and a multiple-choice question related to the video. Your task is to carefully analyze the video and "
      "provide the best answer to question, choosing from the four options provided. Respond with only the letter "
      "(A, B, C, or D) of the correct option.\n\nQuestion: {}\n\nOptions:\n{}\n{}\n{}\n{}\n\nThe best option is:")
SB_SQA = ("You are an advanced video question-answering AI assistant. You have been provided with a video and a "
          "multiple-choice question related to the video. Your task is to carefully analyze the video and the provided "
          "context to answer the question, choosing from the four options provided. Respond with only the letter "
          "(A, B, C, or D) of the correct option.\n\n{}\n\nHere is the question. Answer it and don't confuse it with "
          "the previous conversation.\nQuestion: {}\n\nOptions:\n{}\n{}\n{}\n{}\n\nThe best option is:")
SB_SQA_CONTEXT = ("Here are the contextual information related to the video. Please answer the questions based on "
                  "the contextual information: ")
SB_SQA_TURN = ("At timestamp {stamp}, the following question and answer occurred: Question: {question}; "
               "Options: {options}; Answer: {answer}; ")

VIDEOMME = ("Select the best answer to the following multiple-choice question based on the video. Respond with only "
            "the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\nThe best answer is:")


def ovo_options(options: list[str]) -> str:
    """"A. first; B. second;" as OVO-Bench's `build_prompt` writes them."""
    return "; ".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options)) + ";"


def rekv_mc(question: str, options: list[str]) -> str:
    """ReKV's multiple-choice question (before its model's chat template)."""
    choices = "\n".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(options))
    return f"Question: {question}\nOptions:\n{choices}\nOnly give the best option."
