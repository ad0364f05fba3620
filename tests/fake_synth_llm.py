"""A scripted "oracle" LLM for the synthesis pipeline tests, served by :class:`fake_judge.FakeJudge`.

``oracle_reply(body)`` recognises the pipeline's default prompts by their wording and answers each one
deterministically (same request -> same reply):

* answer: an answer that meets every constraint line it understands (the English wording of
  ``data_pipeline.verifiers.describe``; free-text constraints "Mention the word ZEBRA." are met by
  writing ZEBRA). Markers in the task change that: ``[empty]`` -> an empty answer; ``[sloppy-above:N]``
  -> constraints are ignored when the instruction has more than N of them.
* judge: "k: YES" when every all-caps word (4+ letters) of free-text constraint k occurs in the answer
  (case-insensitive), else "k: NO"; ``[garbage-judge]`` in the task -> a reply without verdicts.
* edit: ADD appends "Mention the word <NEW>.", REVISE replaces the first all-caps word of the first
  free-text constraint, DELETE drops the last constraint.
* expand: one "Mention the word DIMk." line per requested dimension (one line short with ``[bad-expand]``).
* check: "VERDICT: PASS", or "VERDICT: FAIL" with ``[incoherent]`` in the task.
"""
from __future__ import annotations

import hashlib
import re

_CAPS = re.compile(r"\b[A-Z]{4,}\b")


def _user(body: dict) -> str:
    msgs = body.get("messages") or []
    return "\n".join(str(m.get("content", "")) for m in msgs if m.get("role") == "user")


def _section(text: str, name: str) -> str:
    m = re.search(r"\[" + re.escape(name) + r"\]\n(.*?)(?:\n\n\[|\n\nYou may|\n\nOperation:|\n\nWrite exactly|\Z)",
                  text, re.S)
    return m.group(1).strip() if m else ""


def _constraint_lines(instruction: str) -> list[str]:
    if "\nConstraints:\n" not in instruction:
        return []
    block = instruction.split("\nConstraints:\n", 1)[1]
    return [re.sub(r"^\d+\.\s*", "", l).strip() for l in block.splitlines() if re.match(r"^\d+\.", l)]


def _new_word(seed: str) -> str:
    h = hashlib.sha256(seed.encode()).hexdigest()
    return "".join(chr(ord("A") + int(c, 16) % 26) for c in h[:6])


def make_answer(instruction: str) -> str:
    task = instruction.split("\n\nConstraints:\n", 1)[0]
    if "[empty]" in task:
        return ""
    cons = _constraint_lines(instruction)
    m = re.search(r"\[sloppy-above:(\d+)\]", task)
    if m and len(cons) > int(m.group(1)):
        cons = []
    include, exclude, caps = [], [], []
    bullets, items, min_words, max_words = 0, [], 0, 10 ** 9
    lower = no_commas = chinese = False
    start = end = ""
    for c in cons:
        if c.startswith("Include the keyword"):
            include += re.findall(r'"([^"]+)"', c)
        elif c.startswith("Do not use the word"):
            exclude += re.findall(r'"([^"]+)"', c)
        elif (mm := re.match(r"Use (exactly|at most|at least) (\d+) words", c)):
            n = int(mm.group(2))
            if mm.group(1) in ("exactly", "at least"):
                min_words = n
            if mm.group(1) in ("exactly", "at most"):
                max_words = n
        elif (mm := re.match(r"Answer with exactly (\d+) bullet points, one for each of (.*);", c)):
            items = re.findall(r'"([^"]+)"', mm.group(2))
        elif (mm := re.match(r"Answer with exactly (\d+) bullet points", c)):
            bullets = int(mm.group(1))
        elif c.startswith("Write everything in lowercase"):
            lower = True
        elif c.startswith("Do not use any commas"):
            no_commas = True
        elif c.startswith("Answer in Chinese"):
            chinese = True
        elif c.startswith("Start your answer with"):
            start = re.findall(r'"([^"]+)"', c)[0]
        elif c.startswith("End your answer with"):
            end = re.findall(r'"([^"]+)"', c)[0]
        else:
            caps += _CAPS.findall(c)
    words = include + caps
    core = " ".join(words) if words else "ok"
    body = ("这是一个关于这个问题的详细回答内容" * 2 + " " + core) if chinese else f"Here is my answer: {core}."
    if items:
        lines = [f"- {it} point" for it in items]
        text = "\n".join(lines) + "\n" + body
    elif bullets:
        lines = [f"- point {i + 1}" for i in range(bullets)]
        lines[0] += " " + body
        text = "\n".join(lines)
    else:
        text = body
    have = len(re.findall(r"[A-Za-z0-9]+", text))
    if min_words > have:
        text += " " + " ".join(["more"] * (min_words - have + 1))
    del max_words  # answers are short
    for w in exclude:
        text = re.sub(r"(?<![A-Za-z0-9])" + re.escape(w) + r"(?![A-Za-z0-9])", "", text, flags=re.I)
    if start:
        text = start + " " + text
    if end:
        text = text + "\n" + end
    if lower:
        text = text.lower()
    if no_commas:
        text = text.replace(",", "")
    return text


def judge_reply(prompt: str) -> str:
    if "[garbage-judge]" in prompt:
        return "I think the answer is fine overall."
    answer = _section(prompt, "Answer").lower()
    cons = [re.sub(r"^\d+\.\s*", "", l).strip() for l in _section(prompt, "Constraints to grade").splitlines()
            if re.match(r"^\d+\.", l)]
    out = []
    for i, c in enumerate(cons, 1):
        caps = _CAPS.findall(c)
        ok = all(w.lower() in answer for w in caps) if caps else True
        out.append(f"{i}: {'YES' if ok else 'NO'}")
    return "Reasons: checked.\n" + "\n".join(out)


def edit_reply(prompt: str) -> str:
    cons = [re.sub(r"^\d+\.\s*", "", l).strip() for l in _section(prompt, "Current constraints").splitlines()
            if re.match(r"^\d+\.", l)]
    op = re.search(r"Operation: (\w+)", prompt).group(1)
    if op == "ADD":
        cons = cons + [f"Mention the word {_new_word(prompt)}."]
    elif op == "REVISE":
        for i, c in enumerate(cons):
            caps = _CAPS.findall(c)
            if caps:
                cons[i] = c.replace(caps[0], _new_word(prompt))
                break
    else:
        cons = cons[:-1]
    return "Edited constraints:\n" + "\n".join(f"{i}. {c}" for i, c in enumerate(cons, 1))


def oracle_reply(body: dict) -> str:
    prompt = _user(body)
    if prompt.startswith("You are a strict grader"):
        return judge_reply(prompt)
    if prompt.startswith("You edit the constraints"):
        return edit_reply(prompt)
    if prompt.startswith("You write constraints"):
        n = int(re.search(r"Write exactly (\d+) new constraints", prompt).group(1))
        k = n - 1 if "[bad-expand]" in prompt else n
        return "\n".join(f"{i}. Mention the word DIM{chr(ord('A') + i)}X." for i in range(1, k + 1))
    if prompt.startswith("You review a training example"):
        return "Looks right.\nVERDICT: " + ("FAIL" if "[incoherent]" in prompt else "PASS")
    return make_answer(prompt)
