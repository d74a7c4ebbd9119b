"""Students: derive a dense model from the MoE teacher, or check a user's dense model against it."""
