"""The documentation: every relative link in README.md, docs/*.md and the other READMEs reaches a file (and a
heading, for an #anchor into markdown, by GitHub's anchor rules); no tracked file cites the old contract's name;
the alignment example in docs/verl.md runs and gives what passing the right response start gives."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {"build", "dist", "runs", "node_modules"}  # outputs; dot-directories (.venv, .git) too


def markdown_files() -> list[pathlib.Path]:
    """README.md, docs/*.md and the READMEs beside the code (benchmarks/, csrc/simt/), never entering a
    virtual environment or an output folder."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIPPED_DIRS]
        found += [pathlib.Path(folder) / name for name in files if name.endswith(".md")]
    return sorted(found)


DOCS = markdown_files()

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the target ends at the first space (a title may follow) or ")"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its rendered text lowercased, every character that is not a letter, a
    digit, a space, a hyphen or an underscore dropped, each space made a hyphen."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading id of a markdown file; a repeated id gets -1, -2, ... as GitHub numbers them."""
    seen: dict[str, int] = {}
    ids = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = github_anchor(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.add(base if count == 0 else f"{base}-{count}")
    return ids


def links(path: pathlib.Path):
    """(line number, target) of every markdown link and image outside code."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)):
            yield number, match.group(1)


def broken_links(path: pathlib.Path) -> list[str]:
    """Each relative link of ``path`` that reaches no file, or no heading of the markdown file it points into."""
    problems = []
    for number, target in links(path):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # an absolute URL: not checked here
        file_part, _, anchor = target.partition("#")
        where = f"{path.name}:{number}: {target}"
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{where}: no file {resolved}")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


def test_the_documents_are_found():
    found = {str(path.relative_to(ROOT)) for path in DOCS}
    assert {"README.md", "docs/spec.md", "docs/verl.md", "benchmarks/README.md"} <= found, found


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_the_link_check_fails_on_a_broken_file_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## The `op`: what it is\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[fine](other.md#the-op-what-it-is) [fine](other.md#twice-1) ![img](other.md) [web](https://example.org/x)\n"
        "[own](#local) [no file](missing.md) [no anchor](other.md#nowhere) ![no image](pic.png)\n"
        "`[in code](gone.md)`\n```\n[in a fence](gone.md)\n```\n# Local\n")
    assert broken_links(page) == [
        f"page.md:2: missing.md: no file {tmp_path / 'missing.md'}",
        "page.md:2: other.md#nowhere: no heading with anchor #nowhere in other.md",
        f"page.md:2: pic.png: no file {tmp_path / 'pic.png'}",
    ]


@pytest.mark.parametrize("heading, anchor", [
    ("2. The op", "2-the-op"),
    ("`red-ppo study`: RED's gain against the reward's token-credit fidelity",
     "red-ppo-study-reds-gain-against-the-rewards-token-credit-fidelity"),
    ("The critic's start (`model.critic_init`), and why it matters for RED",
     "the-critics-start-modelcritic_init-and-why-it-matters-for-red"),
    ("5.3 Offsets check under torch.compile", "53-offsets-check-under-torchcompile"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


# The old contract's name as a word: its file name, or the name alone before "section 2" or a colon. Spelled in
# parts so that this file does not match it; a longer identifier that contains it does not match (no word boundary).
OLD_CONTRACT = re.compile(rb"\b" + b"SP" + rb"EC\b")


def test_no_tracked_file_cites_SPEC_md_only_docs_spec_md():
    """Every citation of the contract reads "docs/spec.md section N"; the old name appears in no tracked file."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    citing = []
    for name in tracked.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if OLD_CONTRACT.search(line):
                citing.append(f"{name}:{number}")
    assert citing == [], f"cite docs/spec.md instead of the old contract at: {citing}"


def _python_block(path: pathlib.Path, containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"expected one python block with {containing!r} in {path.name}, got {len(found)}"
    return found[0]


def test_the_alignment_example_locates_the_response_where_the_default_would_not():
    """docs/verl.md's example, run on a template whose tail holds the response's text, aligns as the response's
    true start does; the default (the response's last occurrence) lands in the template's tail instead."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import torch

    from red_kernels import redistribute_across_tokenizers
    from align_tokenizers import policy_tokenizer, rm_tokenizer

    code = _python_block(ROOT / "docs" / "verl.md", "redistribute_across_tokenizers")
    code = code.replace("rm_scores = ...", "rm_scores = torch.linspace(-1.0, 2.0, len(rm_ids)) ** 2")
    policy, rm = policy_tokenizer(), rm_tokenizer()
    chat = [{"role": "user", "content": "Say e"}]
    response_ids = policy("e")["input_ids"]
    # The reward model's template ends a turn with "<|end|>": the response "e" also occurs there.
    scope = {"torch": torch, "policy_tokenizer": policy, "rm_tokenizer": rm, "chat": chat,
             "response_ids": response_ids}
    exec(compile(code, "docs/verl.md", "exec"), scope)

    rm_text, response = scope["rm_text"], scope["response"]
    assert response == "e" and rm_text.count("e") >= 2, (rm_text, response)
    start = len(rm.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    assert rm_text[start:start + 1] == "e" and scope["response_start"] == start
    args = (scope["rm_scores"], scope["rm_spans"], rm_text, response, scope["policy_spans"])
    expected = redistribute_across_tokenizers(*args, response_start=start)
    assert torch.equal(scope["out"].token_rewards, expected.token_rewards)
    assert scope["out"].baseline_score == expected.baseline_score
    guessed = redistribute_across_tokenizers(*args)
    assert guessed.baseline_score != expected.baseline_score
