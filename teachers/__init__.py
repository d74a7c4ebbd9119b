"""Teachers: load an MoE causal LM safely, build the default upcycled teacher, cache its top-k logits."""
