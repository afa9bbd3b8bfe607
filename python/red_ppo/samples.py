"""What an evaluation generated, for a person to read: ``samples/step-NNNNNN.jsonl``, one line per held-out
prompt (its text, the policy's response and score, the initial policy's response and score, who won), and
``samples/step-NNNNNN.html``, a few responses with every token shaded by its RED reward (a self-contained page:
inline CSS, no script)."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

NAME = re.compile(r"^step-(\d{6,})\.(jsonl|html)$")
NEGATIVE, POSITIVE = "220, 38, 38", "22, 163, 74"  # red, green

STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
.legend {{ display: flex; align-items: center; gap: .5em; margin-bottom: 1.5em; }}
.bar {{ width: 16em; height: 1em; border: 1px solid #999;
        background: linear-gradient(to right, rgba({NEGATIVE}, 1), rgba({NEGATIVE}, 0) 50%,
                                    rgba({POSITIVE}, 0) 50%, rgba({POSITIVE}, 1)); }}
.sample {{ border-top: 1px solid #ccc; padding: .5em 0 1em; }}
.prompt {{ color: #666; white-space: pre-wrap; font-family: monospace; }}
.response {{ white-space: pre-wrap; font-family: monospace; line-height: 1.8; }}
.response span {{ border-right: 1px solid rgba(0, 0, 0, .15); }}
"""


def samples_path(folder: Path, step: int, suffix: str) -> Path:
    return Path(folder) / f"step-{step:06d}.{suffix}"


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it reads in the decoded response: what it adds to the decoded prefix (so the spaces a
    word-level tokenizer puts between tokens show), or the token decoded alone where the prefix does not simply
    grow (a character split over several byte-level tokens)."""
    texts, before = [], ""
    for count, token in enumerate(ids, 1):
        now = tokenizer.decode(ids[:count], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        added = now[len(before):] if now.startswith(before) else ""
        texts.append(added or tokenizer.decode([token], skip_special_tokens=False))
        before = now
    return texts


def _shade(reward: float, scale: float) -> str:
    return f"rgba({POSITIVE if reward > 0 else NEGATIVE}, {min(1.0, abs(reward) / scale):.3f})"


def reward_page(step: int, samples: list[dict], title: str | None = None) -> str:
    """The HTML page of ``samples``, each ``{"prompt": str, "tokens": [str], "rewards": [float], "score": float}``:
    every response token on a background from red (negative) through white to green (positive), scaled to the
    largest absolute reward on the page; hovering a token shows its exact reward (``repr`` of the float).
    ``title``: the page's title and heading, in place of the evaluation's (which name ``step``)."""
    head, heading = (title, title) if title else (f"RED token rewards, step {step}",
                                                   f"RED token rewards of the policy's responses, step {step}")
    scale = max((abs(r) for sample in samples for r in sample["rewards"]), default=0.0) or 1.0
    blocks = []
    for index, sample in enumerate(samples):
        tokens = "".join(f'<span style="background: {_shade(r, scale)}" title="{r!r}">{html.escape(text)}</span>'
                         for text, r in zip(sample["tokens"], sample["rewards"], strict=True))
        blocks.append(f'<div class="sample"><h3>sample {index}: score {sample["score"]:.4g}, '
                      f'{len(sample["tokens"])} tokens, token rewards sum to {sum(sample["rewards"]):.4g}</h3>\n'
                      f'<div class="prompt">{html.escape(sample["prompt"])}</div>\n'
                      f'<div class="response">{tokens}</div></div>')
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(head, quote=False)}</title>'
            f'<style>{STYLE}</style></head>\n<body><h2>{html.escape(heading, quote=False)}</h2>\n'
            f'<div class="legend">token reward <span>{-scale:.4g}</span><span class="bar"></span>'
            f'<span>+{scale:.4g}</span> (white: 0; hover a token for its exact reward)</div>\n'
            + "\n".join(blocks) + "\n</body></html>\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_samples(folder: Path, step: int, records: list[dict], pages: list[dict]) -> None:
    """``records`` as ``step-NNNNNN.jsonl`` and, when ``pages`` holds any sample, their `reward_page` as
    ``step-NNNNNN.html``; each file replaced whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(samples_path(folder, step, "jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if pages:
        _write_text(samples_path(folder, step, "html"), reward_page(step, pages))


def drop_samples_after(folder: Path, step: int) -> None:
    """Remove the samples of steps after ``step`` (written after the checkpoint a run resumes from)."""
    folder = Path(folder)
    if folder.is_dir():
        for name in os.listdir(folder):
            if (m := NAME.match(name)) and int(m.group(1)) > step:
                (folder / name).unlink()
