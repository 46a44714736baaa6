"""The tiny Hugging Face models the mergekit goldens are made from, rebuilt bit for bit wherever they are needed.

``benchmarks/mergekit_golden.py`` (run by hand with mergekit's own venv) and
``tests/merging/methods/test_mergekit_golden.py`` (run with soupkit's) both call ``build_models(folder)``: each
architecture's config is random-initialised by transformers, then every tensor is overwritten from one seeded
``torch.Generator`` in sorted key order, so the weights do not depend on transformers' init code (which differs
between versions), only on torch's ``randn``.
Fine-tunes are the base plus seeded noise, so their task vectors are small and their signs disagree, as TIES and
DARE need; one fine-tune per architecture has a sparse task vector (zeros exercise sign elections and slerp's
zero-norm branch).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: architecture -> (config class name, config kwargs). 6 layers, so gradients of 1..5 values all interpolate.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, sliding_window=None)),
    "gpt2": ("GPT2Config", dict(vocab_size=64, n_embd=16, n_layer=6, n_head=4, n_positions=32, bos_token_id=1,
                                eos_token_id=2)),
}
#: model folder name -> (architecture, seed of its task vector; None for the base, "sparse" keeps 10%)
MODELS = {f"{arch}_{role}": (arch, role) for arch in ARCHITECTURES for role in ("base", "ft1", "ft2", "ft3")}
_SEEDS = {"base": 0, "ft1": 1, "ft2": 2, "ft3": 3}


def _state(arch: str, role: str, keys_shapes: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    base = torch.Generator().manual_seed(1000 + list(ARCHITECTURES).index(arch))
    state = {k: torch.randn(shape, generator=base) * 0.5 for k, shape in keys_shapes}
    if role == "base":
        return state
    noise = torch.Generator().manual_seed(2000 + 10 * list(ARCHITECTURES).index(arch) + _SEEDS[role])
    for key, tensor in state.items():
        delta = torch.randn(tensor.shape, generator=noise) * 0.05
        if role == "ft3":  # a sparse task vector: ~90% exact zeros
            delta = delta * (torch.rand(tensor.shape, generator=noise) < 0.1)
        state[key] = tensor + delta
    return state


def build_models(folder: Path) -> dict[str, Path]:
    """Write every model of ``MODELS`` under ``folder`` (``save_pretrained``, safetensors, float32); returns
    name -> folder. Already-written folders are kept."""
    import transformers

    paths = {}
    for name, (arch, role) in MODELS.items():
        path = Path(folder) / name
        paths[name] = path
        if (path / "config.json").exists():
            continue
        config_class, kwargs = ARCHITECTURES[arch]
        config = getattr(transformers, config_class)(**kwargs)
        model = transformers.AutoModelForCausalLM.from_config(config).float()
        state, seen, params = model.state_dict(), set(), []
        for key in sorted(state):  # a tied pair (GPT-2's lm_head / wte) is filled once, under its first name
            if state[key].is_floating_point() and state[key].data_ptr() not in seen:
                seen.add(state[key].data_ptr())
                params.append((key, state[key].shape))
        new = _state(arch, role, params)
        with torch.no_grad():
            for key, tensor in new.items():
                state[key].copy_(tensor)
        model.save_pretrained(path, safe_serialization=True)
    return paths


def fingerprint(tensor: torch.Tensor) -> dict:
    """What a golden file keeps of one output tensor: shape, the fp32 bytes' sha256 (bit identity, for copies and
    slices), float64 sum and norm, a seeded random projection (any change moves it) and 16 evenly spaced values."""
    import hashlib

    flat = tensor.detach().to(torch.float32).contiguous().reshape(-1)
    wide = flat.double()
    probe = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picks = torch.linspace(0, flat.numel() - 1, min(16, flat.numel())).long()
    return {"shape": list(tensor.shape), "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            "sum": wide.sum().item(), "norm": wide.norm().item(), "projection": (wide @ probe).item(),
            "samples": [flat[i].item() for i in picks]}


def substitute(value, paths: dict[str, Path]):
    """A config template with every ``@name`` string replaced by that model's folder."""
    if isinstance(value, dict):
        return {k: substitute(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, paths) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        return str(paths[value[1:]])
    return value
