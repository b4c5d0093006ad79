"""Operations on trained models (upcycling, LoRA experts, pruning, merging, skipping), written against
the MoE-layer protocol (:mod:`moelab.models.moe_protocol`) so they also apply to imported models."""
