"""The `eval` and `latency` config sections. Defaults are the default preset's; `validate` holds each
section's rules, the only place they are checked."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import require

SWITCH = ("auto", "on", "off")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def known_tasks() -> list[str]:
    """The task and group names this project's lm-eval task folder defines (read from the YAMLs' `task:` and
    `group:` lines: parsing them whole would need lm-eval's own YAML tags)."""
    names = set()
    for f in TASKS_DIR.glob("*.yaml"):
        names.update(re.findall(r"^(?:task|group):[ \t]*([A-Za-z0-9_.-]+)[ \t]*$", f.read_text(), re.M))
    return sorted(names)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: [
        "local_hellaswag", "local_arc_easy", "local_piqa", "local_winogrande", "local_lambada_openai"])
    limit: int = 25  # examples per task (0: all)
    heldout: bool = True  # bits per byte on the held-out text
    batch_size: int = 8
    # Also score each student as derived, before distillation: what training added, and what the dropped layers
    # cost. Off saves one evaluation per student (about a minute each at the h100 preset's 1,000 examples). It only
    # switches that stage, so it is not part of the other evaluations' identity.
    student_init: bool = field(default=True, metadata={"identity": False})

    def validate(self) -> None:
        require(self.limit >= 0, "eval.limit must be >= 0 (0 means all examples)")
        known = known_tasks()
        unknown = [t for t in self.tasks if t not in known]
        require(not unknown, f"eval.tasks: unknown task {', '.join(map(repr, unknown))}; available: "
                f"{', '.join(known)}")
        require(self.batch_size >= 1, "eval.batch_size must be >= 1")


@dataclass
class LatencyConfig:
    enabled: bool = True
    repeats: int = 0  # timed repeats per setting (0: the benchmark's default for the device)
    cpu_threads: int = 1  # CPU only: threads while timing (two threads on a busy 2-core box are noisy)
    # GPU only: also time decode on a static cache with torch.compile ("auto": on, as the device default;
    # compiling costs about a minute per model and batch size).
    static_compile: str = "auto"
    # GPU only: also time greedy decode replaying one CUDA graph per step (eval/graph_decode.py): the model's own
    # time per token, without generate's per-token Python loop ("auto": on, as the device default).
    graph_decode: str = "auto"
    teacher_fused: bool = True  # GPU only: also time the teacher on our fused MoE kernels (kernels.hf_moe)

    def validate(self) -> None:
        require(self.static_compile in SWITCH, f"latency.static_compile must be one of: {', '.join(SWITCH)}")
        require(self.graph_decode in SWITCH, f"latency.graph_decode must be one of: {', '.join(SWITCH)}")
