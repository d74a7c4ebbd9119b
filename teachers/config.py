"""The teacher's config sections: how the built-in teacher is made (`teacher_options`), how it is trained further
(`teacher_tune`) and how its logits are cached (`logits`). Defaults are the default preset's; `validate` holds
each section's rules, the only place they are checked."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import require


@dataclass
class TeacherConfig:
    num_experts: int = 4  # experts per layer when upcycling a dense model (smollm2-moe)
    top_k: int = 2  # experts each token is routed to
    router_init_std: float = 0.02  # upcycled routers start near uniform; experts are identical copies anyway
    allow_dense: bool = False  # dense-to-dense runs: accept a teacher without experts
    trust_remote_code: bool = False  # never run model code from a checkpoint unless asked

    def validate(self) -> None:
        require(self.num_experts >= 1, "teacher_options.num_experts must be >= 1")
        require(1 <= self.top_k <= self.num_experts,
                "teacher_options.top_k must be between 1 and teacher_options.num_experts")


BALANCE_FORMS = ("per_layer", "pooled")
EXPERT_MATMULS = ("bf16", "fp32")


@dataclass
class TeacherTuneConfig:
    # Continued training of the teacher before it labels the data (teachers/continued_training.py): an
    # upcycled teacher's experts are copies until trained; 0 steps uses the teacher as it is.
    steps: int = 0  # optimizer steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_size: int = 32  # sequences per optimizer step (after accumulation)
    micro_batch_size: int = 8
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss
    # "per_layer": the loss of each MoE layer, averaged; "pooled": transformers' form, tokens of all layers
    # pooled, which balances only each expert's load summed over the layers.
    balance: str = "per_layer"
    router_jitter: float = 0.0  # multiplicative noise on the MoE input while training (Mixtral's jitter)
    expert_noise: float = 0.0  # relative std of noise added to each expert copy before the first step
    grad_clip: float = 1.0
    # GPU: "bf16" runs the expert matmuls in bf16 from the fp32 masters (teachers/autocast_experts.py);
    # "fp32" leaves transformers' grouped_mm path as it is, which runs them in fp32.
    expert_matmul: str = "bf16"
    checkpoint_every: int = 50
    probe_sequences: int = 64  # training sequences the routing is measured on, before and after
    seed: int = 0

    def validate(self) -> None:
        require(self.steps >= 0 and self.lr > 0 and self.checkpoint_every >= 1 and self.aux_loss_coef >= 0
                and self.router_jitter >= 0 and self.expert_noise >= 0 and self.probe_sequences >= 0,
                "teacher_tune: steps, aux_loss_coef, router_jitter, expert_noise and probe_sequences must be >= 0, "
                "lr > 0 and checkpoint_every >= 1")
        require(self.balance in BALANCE_FORMS, f"teacher_tune.balance must be one of: {', '.join(BALANCE_FORMS)}")
        require(self.expert_matmul in EXPERT_MATMULS,
                f"teacher_tune.expert_matmul must be one of: {', '.join(EXPERT_MATMULS)}")
        require(self.batch_size >= self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size == 0,
                "teacher_tune.batch_size must be a positive multiple of teacher_tune.micro_batch_size")


@dataclass
class LogitsConfig:
    top_k: int = 64  # teacher log-probs kept per token; the rest is one tail bucket
    batch_size: int = 4
    sequences_per_shard: int = 32
    # Sequence-level KD (teachers/teacher_text.py): this many extra training sequences written by the teacher
    # itself, each continuing the first `teacher_text_prompt` tokens of a training sequence (cycling, so any
    # number can be asked for), labelled like the rest and trained on by the student.
    teacher_text_sequences: int = 0
    teacher_text_prompt: int = 32
    teacher_text_temperature: float = 1.0  # the teacher's sampling temperature (0: greedy)
    teacher_text_seed: int = 0

    def validate(self) -> None:
        require(self.top_k >= 1, "logits.top_k must be >= 1")
        require(self.teacher_text_sequences >= 0, "logits.teacher_text_sequences must be >= 0")
        require(self.teacher_text_prompt >= 1, "logits.teacher_text_prompt must be >= 1 (tokens of training text "
                "each teacher sequence starts from)")
        require(self.teacher_text_temperature >= 0, "logits.teacher_text_temperature must be >= 0 (0: greedy)")
        require(self.batch_size >= 1, "logits.batch_size must be >= 1")
        require(self.sequences_per_shard >= 1, "logits.sequences_per_shard must be >= 1")
