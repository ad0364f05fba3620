"""The EIFBench protocol texts: the answer prompt, the yes/no judge prompt (one judge call per
(sub-instruction, constraint)) and the verdict parser (docs/metrics.md).

They are shared by the evaluation (:mod:`evaluation.eifbench`) and the RL judge reward
(:mod:`iopo_jax.rl.rewards`); they live in the data pipeline, the lowest layer, so that both can
import them (``iopo_jax`` may not import ``evaluation``). The templates are our own wording; template
files can replace them (``--config.judge.template``, ``--config.generation.answer_template``).
Standard library only.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

EIF_SYSTEM_PROMPT = "You are a helpful assistant."

EIF_ANSWER_TEMPLATE = """You will complete a multi-part task. The material below starts with the shared input, followed by several SUB_INSTRUCTIONs; each SUB_INSTRUCTION lists the constraints its answer must satisfy.

Rules:
- Answer every SUB_INSTRUCTION, one after another, in the order given. Start each answer with its own heading, e.g. "SUB_INSTRUCTION_0:", and answer only that sub-task under it.
- Follow every constraint of a SUB_INSTRUCTION exactly; keep the answers consistent with each other and with the input.
- Write in the language of the task. Do not repeat the input material.

=== Task ===
{input_text}

=== Your answers ===
"""

YES_NO_JUDGE_TEMPLATE = """You are a strict and impartial grader. Decide whether one specific constraint of one sub-task is satisfied by a model's answer.

How to judge:
- Look only at the part of the answer that addresses the given sub-task. If that part is missing, the constraint is not satisfied.
- Judge only the given constraint; ignore every other requirement of the task.
- Say yes only if the constraint is met completely and without ambiguity. "Mostly", "partly" or "roughly" met counts as no.

Reply with a short analysis, then one final line that is exactly "答案：是" (satisfied) or "答案：否" (not satisfied).

[Task input]
{input}

[Model answer]
{output}

[Sub-task]
{sub_instruction}

[Constraint]
{question}
"""

YES_NO_RE = re.compile(r"答案：是|答案：否")


def parse_yes_no(text: Optional[str]) -> Optional[tuple[bool, str]]:
    """``(verdict, rule)`` of a yes/no judge reply, or None when it is empty (unparseable).

    If ``答案：是|答案：否`` matches exactly once, that match decides (rule ``"exact"``); otherwise the
    verdict is yes only when ``是`` occurs and ``否`` does not (rule ``"fallback"``).
    """
    if not text or not text.strip():
        return None
    matches = YES_NO_RE.findall(text)
    if len(matches) == 1:
        return matches[0].endswith("是"), "exact"
    return ("是" in text and "否" not in text), "fallback"


def format_sub_instruction(key: str, instruction: str, constraints: Sequence[str]) -> str:
    """One sub-instruction of the EIFBench generation input: ``{key}:\\n{instruction}\\nconstraints:\\n...``."""
    return f"{key}:\n{instruction}\nconstraints:\n" + "\n".join(constraints)


def eif_input_text(task_input: str, blocks: Sequence[str]) -> str:
    """The generation input text: ``Instruction:\\n{input}\\n\\n`` then the formatted sub-instructions."""
    return f"Instruction:\n{task_input}\n\n" + "\n\n".join(blocks)


def render_template(template: str, name: str, **fields) -> str:
    """``template.format(**fields)`` with an error naming the template and its fields."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{name}: cannot render the template ({type(e).__name__}: {e}); its fields are "
                         + ", ".join("{" + k + "}" for k in fields)) from None
