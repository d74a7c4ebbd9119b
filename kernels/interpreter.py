"""Whether our Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1), and what differs there.

Triton 3.9's interpreter computes `tl.dot` on bf16/fp16 operands from their raw bit patterns (results of
order 1e10 for unit inputs), so under the interpreter the kernels upcast dot operands to float32 first. The
compiled GPU path never takes that branch: it is a compile-time constant.
"""

from __future__ import annotations

import os

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
