"""The conversation format: how chat turns become one prompt for a FROMAGe model, shared by the
server's chat API and the demo. A user turn is "Q: <text>\\nA:" with its images in place; an answer
follows it and ends with a newline. A generated answer stops there, or where the model starts the next
question itself (ANSWER_STOPS). A system message is plain text before the first turn."""
from __future__ import annotations

from .prompt import Part

ANSWER_STOP = "\n"
ANSWER_STOPS = (ANSWER_STOP, "Q:")


def user_turn(parts: list[Part]) -> list[Part]:
    """A user's parts -> "Q: <text>\\nA:", images kept in place."""
    out, asked = [], False
    for p in parts:
        if isinstance(p, str):
            out.append(p if asked else f"Q: {p}")
            asked = True
        else:
            out.append(p)
    if out and isinstance(out[-1], str):
        out[-1] += "\nA:"
    else:
        out.append("\nA:")
    return out


def answer_turn(parts: list[Part]) -> list[Part]:
    """An answer's parts (text and images) as context for the next turn, ended by a newline."""
    parts = list(parts)
    if parts and isinstance(parts[-1], str):
        parts[-1] += ANSWER_STOP
    else:
        parts.append(ANSWER_STOP)
    return parts


def chat_prompt(messages: list[tuple[str, list[Part]]]) -> list[Part]:
    """[(role, parts)] with role system, user or assistant -> the prompt for the next answer."""
    prompt: list[Part] = []
    for role, parts in messages:
        if role == "system":
            prompt += [p + "\n" if isinstance(p, str) else p for p in parts]
        elif role == "user":
            prompt += user_turn(parts)
        else:
            prompt += [(" " + p if i == 0 and isinstance(p, str) else p) for i, p in enumerate(answer_turn(parts))]
    return prompt


class AnswerStart:
    """An answer starts at its first non-blank character (the format puts a space after "A:"): called on
    each piece of text in order, it strips what comes before."""

    def __init__(self):
        self.started = False

    def __call__(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text


def answer_parts(result_parts: list, image=dict) -> list:
    """A Result's parts from the answer's first non-blank character (AnswerStart): text parts as
    {"type": "text", "text"}, image parts through `image` (default: copied as they are)."""
    out, start = [], AnswerStart()
    for p in result_parts:
        if p["type"] != "text":
            out.append(image(p))
        elif text := start(p["text"]):
            out.append({"type": "text", "text": text})
    return out
