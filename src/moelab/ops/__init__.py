"""Operations on trained MoE models (prune, merge, skip, upcycle, LoRA, re-route), written against the
MoE-layer protocol (:mod:`moelab.models.moe_protocol`) so they apply to imported models too."""
