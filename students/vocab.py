"""Teacher and student must share a vocabulary token by token for logit distillation to mean anything."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from core.errors import UserError


class VocabMismatchError(UserError, ValueError):
    """The student's tokenizer maps some id to a different token than the teacher's."""
    kind = "vocabulary"


def shared_vocab_size(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                      teacher_rows: int, student_rows: int) -> int:
    """Check the tokenizers agree and return the number of real (non-padding) vocabulary rows.

    Embedding matrices are often padded past the tokenizer's length (to a multiple of 64, say); such rows
    are never a target, so sizes that differ only there are fine: the loss uses the first `n` columns.
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        t_by_id = {i: t for t, i in tv.items()}
        s_by_id = {i: t for t, i in sv.items()}
        diffs = [(i, t_by_id.get(i), s_by_id.get(i)) for i in sorted(set(t_by_id) | set(s_by_id))
                 if t_by_id.get(i) != s_by_id.get(i)]
        shown = "; ".join(f"id {i}: teacher {t!r} vs student {s!r}" for i, t, s in diffs[:5])
        raise VocabMismatchError(
            f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens, {len(diffs)} ids differ; "
            f"first: {shown}). Logit distillation needs one shared vocabulary: pick a student from the "
            "teacher's family or STUDENT=derived.")
    n = len(tv)
    if teacher_rows < n or student_rows < n:
        raise VocabMismatchError(f"a model has fewer output rows than its tokenizer has tokens "
                                 f"(teacher {teacher_rows}, student {student_rows}, tokenizer {n})")
    return n
