"""The `distill` config section: the KD loss, the teacher's form (cache or online), the optimiser and the
parallel layout. Defaults are the default preset's; `validate` holds every rule of the section, the only place
each is checked (the loss's own rules through `KDLossSpec`)."""
from __future__ import annotations

from dataclasses import dataclass

from core.distributed import world_size
from core.errors import ConfigError, require
from distill.kd_losses import KDLossSpec

TEACHER_MODES = ("cache", "online")
SWITCH = ("auto", "on", "off")
PARALLEL = ("ddp", "fsdp")
LAYER_LOSSES = ("nmse", "mse", "cosine")  # distill/layer_transfer.py


@dataclass
class DistillConfig:
    loss: str = "forward_kl"  # forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tv
    kd_weight: float = 1.0
    ce_weight: float = 0.5
    temperature: float = 1.0  # KD at this temperature, scaled by T^2; CE stays at T = 1
    beta: float = 0.5  # jsd: teacher's weight in the mixture
    alpha: float = 0.1  # skew_kl / skew_reverse_kl: skew weight
    teacher_mode: str = "cache"  # "cache": the logits stage's top-k cache; "online": teacher forward per batch
    online_top_k: int = 64  # online: teacher ids kept per token (0: the whole vocabulary, unfused)
    fused_loss: str = "auto"  # "auto" (fused when the output layer allows), "on", "off"
    hidden_weight: float = 0.0  # online: weight of the MSE between (projected) student and teacher last hidden
    # online, derived students: weight of the loss matching each student layer's output to the teacher layer it
    # was derived from (distill/layer_transfer.py); layer_loss: "nmse" (MSE over the teacher layer's mean square:
    # scale-free, so one weight means the same for any model; on the h100 teacher the raw "mse" was 97% of the
    # loss at weight 0.5, docs/results/ab_h100), "mse" or "cosine". Online only, on purpose: cached
    # layer outputs would take tokens x layers x width x 2 bytes (110 GB for PRESET=h100, 93x its logit cache)
    layer_weight: float = 0.0
    layer_loss: str = "nmse"
    # On-policy distillation (distill/on_policy.py; GKD): this share of the optimizer steps, spread evenly, trains
    # on continuations the student samples from prompts cut from the training text, scored by the teacher run
    # online (loaded for it even with teacher_mode=cache); the other steps use `teacher_mode` as usual.
    on_policy_rate: float = 0.0
    # the divergence on on-policy steps (any of `loss`'s; temperature, beta and alpha are shared); no CE there
    on_policy_loss: str = "reverse_kl"
    on_policy_prompt: int = 0  # tokens of each training sequence given as the prompt (0: half the sequence)
    on_policy_tokens: int = 0  # tokens the student samples after it (0: the rest of the sequence)
    sample_temperature: float = 1.0  # the student's sampling temperature on those steps (0: greedy)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (merged into the weights at the end)
    lora_alpha: float = 0.0  # 0: 2 x rank
    gradient_checkpointing: bool = False
    compile: str = "auto"  # torch.compile the student's decoder: "auto" (on GPU), "on", "off"
    # With several processes (GPUS=<n>): "ddp", a full student per process, gradients averaged; or "fsdp"
    # (FSDP2), parameters, gradients and optimizer state sharded over the processes, for students too large.
    parallel: str = "ddp"
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 2
    batch_size: int = 8  # sequences per optimizer step (after accumulation)
    micro_batch_size: int = 4
    epochs: int = 1
    max_steps: int = 0  # 0: one pass over the cache times `epochs`
    grad_clip: float = 1.0
    checkpoint_every: int = 4  # optimizer steps between resumable checkpoints
    seed: int = 0

    def loss_spec(self) -> KDLossSpec:
        """What the loss computes; raises ConfigError naming the setting if the section cannot make one."""
        try:
            return KDLossSpec(self.loss, self.temperature, self.kd_weight, self.ce_weight, self.beta, self.alpha)
        except ValueError as e:
            raise ConfigError(f"distill: {e} (distill.loss, temperature, kd_weight, ce_weight, beta, alpha)") from e

    def on_policy_spec(self) -> KDLossSpec:
        """The loss of on-policy steps: `on_policy_loss` at the section's temperature, KD only (the student's own
        sample is not a label to learn)."""
        try:
            return KDLossSpec(self.on_policy_loss, self.temperature, self.kd_weight, 0.0, self.beta, self.alpha)
        except ValueError as e:
            raise ConfigError(f"distill: {e} (distill.on_policy_loss, temperature, beta, alpha)") from e

    def needs_teacher(self) -> bool:
        """Whether training runs the teacher model itself (online targets or on-policy scoring)."""
        return self.teacher_mode == "online" or self.on_policy_rate > 0

    def validate(self, processes: int | None = None) -> None:
        """Every rule of the section. `processes`: how many share each optimizer step (default: the launcher's
        WORLD_SIZE, set before Python starts)."""
        world = world_size() if processes is None else processes
        self.loss_spec()
        require(self.lr > 0, "distill.lr must be > 0")
        require(self.batch_size >= self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size == 0,
                "distill.batch_size must be a positive multiple of distill.micro_batch_size")
        # Each process takes an equal part of every optimizer step's sequences, in whole micro-batches.
        require(self.batch_size % (world * self.micro_batch_size) == 0,
                f"distill.batch_size={self.batch_size} must be a multiple of {world} processes x "
                f"distill.micro_batch_size={self.micro_batch_size}")
        require(self.checkpoint_every >= 1, "distill.checkpoint_every must be >= 1")
        require(self.epochs >= 1 and self.max_steps >= 0, "distill.epochs must be >= 1 and distill.max_steps >= 0")
        require(self.teacher_mode in TEACHER_MODES, f"distill.teacher_mode must be one of: {', '.join(TEACHER_MODES)}")
        require(self.fused_loss in SWITCH, f"distill.fused_loss must be one of: {', '.join(SWITCH)}")
        require(self.compile in SWITCH, f"distill.compile must be one of: {', '.join(SWITCH)}")
        require(self.parallel in PARALLEL, f"distill.parallel must be one of: {', '.join(PARALLEL)}")
        require(self.parallel == "ddp" or self.lora_rank == 0,
                "distill.parallel=fsdp does not take LoRA students (distill.lora_rank > 0): use distill.parallel=ddp")
        require(self.online_top_k >= 0 and self.lora_rank >= 0 and self.hidden_weight >= 0,
                "distill.online_top_k, lora_rank and hidden_weight must be >= 0")
        require(self.hidden_weight == 0 or self.teacher_mode == "online",
                "distill.hidden_weight > 0 needs distill.teacher_mode=online (the cache holds no hidden states)")
        require(self.layer_weight >= 0, "distill.layer_weight must be >= 0")
        require(self.layer_weight == 0 or self.teacher_mode == "online",
                "distill.layer_weight > 0 needs distill.teacher_mode=online (the cache holds no hidden states)")
        require(self.layer_loss in LAYER_LOSSES, f"distill.layer_loss must be one of: {', '.join(LAYER_LOSSES)}")
        require(0.0 <= self.on_policy_rate <= 1.0, f"distill.on_policy_rate must be in [0, 1], got {self.on_policy_rate}")
        if self.on_policy_rate > 0:
            require(self.kd_weight > 0, "distill.on_policy_rate > 0 needs distill.kd_weight > 0: on-policy steps "
                    "learn only from the teacher's scores")
            self.on_policy_spec()
        require(self.on_policy_prompt >= 0 and self.on_policy_tokens >= 0,
                "distill.on_policy_prompt and on_policy_tokens must be >= 0 (0: the default split of the sequence)")
        require(self.sample_temperature >= 0, "distill.sample_temperature must be >= 0 (0: greedy)")
