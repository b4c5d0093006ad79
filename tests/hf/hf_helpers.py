"""Tiny random Hugging Face MoE models (one per supported family), saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

V = 320
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=0)


def family_configs():
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "olmoe": tf.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=4, num_experts_per_tok=2),
        "qwen2_moe": tf.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=48,
                                       shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                       decoder_sparse_step=1),
        "qwen3_moe": tf.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=48, num_experts=4,
                                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=8),
        "deepseek_v3": tf.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
                                           intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                                           num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=2,
                                           first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=16,
                                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        "gpt_oss": tf.GptOssConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                   head_dim=8, sliding_window=8, swiglu_limit=0.6,
                                   layer_types=["sliding_attention", "full_attention"]),
    }


def random_model(name: str, seed: int = 0):
    """The family's tiny model with every weight ~N(0, 0.3) (biases, norms and DeepSeek's correction
    bias too), so routing is decisive and every option matters."""
    import transformers as tf

    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(family_configs()[name]).eval()
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.5)
        for n, b in m.named_buffers():
            if "e_score" in n:
                b.normal_(0, 0.3)
    return m


def make_tokenizer():
    """A byte-level BPE with <pad>=0, <s>=1, </s>=2, as a transformers fast tokenizer."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.", "import os, sys"] * 20
    tok.train_from_iterator(text, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_family(name: str, folder: Path, seed: int = 0, tokenizer: bool = True):
    m = random_model(name, seed)
    m.save_pretrained(str(folder))
    if tokenizer:
        make_tokenizer().save_pretrained(str(folder))
    return m


def prompts():
    """Three rows with right padding, left padding and none; attention mask 1 = real."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 11), generator=g)
    att = torch.ones(3, 11, dtype=torch.long)
    att[1, 8:] = 0
    att[2, :3] = 0
    return ids, att
