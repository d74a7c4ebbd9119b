"""The `student_options` config section: how a student is derived from the teacher (or initialised from a
config.json). Defaults are the default preset's; `validate` holds the section's rules, checked only here."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import require
from students.expert_merge import METHODS


@dataclass
class StudentConfig:
    # The winner of `make compare-derivations` (docs/results/derivation_methods.md): held-out 1.15 bits per
    # byte after KD against 2.03 for every other layer, same size and budget.
    method: str = "uniform"  # how a derived student's FFN is built from the experts: uniform, frequency, select, svd
    keep_layers: str = "top_16"  # "all", "every_<n>", "top_<n>" / "top_<p>%" (most influential), or indices
    ffn_width: int = 0  # width of the merged routed experts, 0: one expert's (method=select may set any width)
    svd_rank: int = 0  # method=svd: hidden-space rank kept, 0: full (= frequency)
    calib_sequences: int = 8  # training sequences the teacher's routing and layer influence are measured on
    seed: int = 0  # initialisation of a student built from a config.json (STUDENT=path/to/config.json)

    def validate(self) -> None:
        require(self.method in METHODS, f"student_options.method must be one of: {', '.join(METHODS)}")
        require(self.ffn_width >= 0 and self.calib_sequences >= 1,
                "student_options.ffn_width must be >= 0 and student_options.calib_sequences >= 1")
        require(self.svd_rank >= 0 and (self.svd_rank == 0 or self.method == "svd"),
                "student_options.svd_rank must be >= 0 and applies to student_options.method=svd only")
