"""A compact pre-norm Transformer (RMSNorm, RoPE, SwiGLU) whose attention takes a mask spec.

    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=12, mask_id=11, max_len=163))
    logits = model(tokens, mask=masks.block_causal(9, prefix=82))      # [B, T, V]
    cache = model.new_cache(batch_size, max_len)                       # decoding with a KV cache
    logits = model(tokens[:, s:e], mask=spec.replace(q_offset=s), cache=cache, start=s)

Discrete tasks read tokens through an embedding and write logits through ``head``; the training
loss never builds logits (``bk.linear_masked_cross_entropy`` on the hidden states and
``head.weight``). The continuous task (``input_dim > 0``) reads d-dim vectors through a linear
layer, replaces masked vectors by a learned mask embedding and writes d-dim predictions.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import blockmdm_kernels as bk
from blockmdm_kernels import masks

# Optional keywords of the cross-entropy that this installation accepts: ``rows`` lets a caller
# that knows the loss rows spare the kernel its nonzero() (a host sync on CUDA).
_CE_KEYWORDS = frozenset(inspect.signature(bk.linear_masked_cross_entropy).parameters)

PRESETS = {
    "tiny": dict(n_layer=2, dim=64, n_head=4),
    "small": dict(n_layer=4, dim=128, n_head=4),
    "paper": dict(n_layer=12, dim=256, n_head=8),
}


@dataclass
class ModelConfig:
    """Sizes of the Transformer. ``vocab_size > 0`` for token tasks, ``input_dim > 0`` for
    the continuous task (exactly one of them)."""

    vocab_size: int = 0
    mask_id: int = -1
    input_dim: int = 0
    n_layer: int = 2
    dim: int = 64
    n_head: int = 4
    n_kv_head: int | None = None
    intermediate: int | None = None
    max_len: int = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate is None:
            self.intermediate = _round_up(int(8 * self.dim / 3), 32)
        for name in ("n_layer", "dim", "n_head", "n_kv_head", "intermediate", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (self.vocab_size > 0) == (self.input_dim > 0):
            raise ValueError(
                "exactly one of vocab_size (token tasks) and input_dim (continuous task) must be "
                f"> 0, got vocab_size={self.vocab_size}, input_dim={self.input_dim}"
            )
        if self.vocab_size > 0 and not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id must be in [0, {self.vocab_size}), got {self.mask_id}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 2:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_head ({self.n_head}) into an even "
                "head size"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A named preset (``tiny``, ``small``, ``paper``) with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class KVCache:
    """Pre-allocated keys and values of every layer: ``k``, ``v`` [n_layer, B, max_len, Hkv, D]."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        if max_len > config.max_len:
            raise ValueError(f"max_len must be <= config.max_len={config.max_len}, got {max_len}")
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v [B, t, Hkv, D] at positions start.., returns the keys/values 0..start+t."""
        stop = start + k.shape[1]
        self.k[layer, :, start:stop] = k
        self.v[layer, :, start:stop] = v
        return self.k[layer, :, :stop], self.v[layer, :, :stop]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the native CPU kernels for a decoding step (whose few rows make torch's composite cost
        # more than the matrix products) and for float32 training; F.rms_norm elsewhere
        return bk.rms_norm(x, self.weight.to(x.dtype), self.eps)


def _rope_tables(head_dim: int, max_len: int, base: float):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()  # [max_len, D/2]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, \
            config.head_dim
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_kv_head)
                              * config.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, start, keep=None):
        """Attention output [B, t, dim]; with ``keep``, only the first ``keep`` positions query
        (every position still gives its key and value): [B, keep, dim]."""
        B, t, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if keep is None:
            # Queries and keys turned, values copied, in one call (q, k, v are views of its
            # output, so their gradients come back as one tensor).
            qkv = self.wqkv(x).view(B, t, H + 2 * Hkv, D)
            q, k, v = bk.rope(qkv, cos, sin, heads=H + Hkv).split([H, Hkv, Hkv], dim=2)
        else:
            w_q, w_kv = self.wqkv.weight.split([H * D, 2 * Hkv * D])
            q = F.linear(x[:, :keep], w_q).view(B, keep, H, D)
            q = bk.rope(q, cos[:, :keep], sin[:, :keep])
            k, v = F.linear(x, w_kv).view(B, t, 2 * Hkv, D).split([Hkv, Hkv], dim=2)
            k = bk.rope(k, cos, sin)
        tq = q.shape[1]
        if cache is not None:
            k, v = cache.update(self.layer, start, k.to(cache.k.dtype), v.to(cache.v.dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        o = bk.block_attention(q, k, v, mask)
        return self.wo(o.reshape(B, tq, H * D))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate, bias=False)
        self.w2 = nn.Linear(config.intermediate, config.dim, bias=False)

    def forward(self, x):
        return self.w2(bk.swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache, start, keep=None):
        """The block's output [B, t, dim], or for the first ``keep`` positions only."""
        out = self.attention(self.attention_norm(x), cos, sin, mask, cache, start, keep)
        x = out + (x if keep is None else x[:, :keep])
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """The backbone. ``model(x, mask=..., cache=..., start=...)`` follows the decoding contract:
    logits [B, t, V] for positions start..start+t-1 (d-dim predictions for the continuous task).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.continuous = config.input_dim > 0
        if self.continuous:
            self.read_in = nn.Linear(config.input_dim, config.dim)
            self.mask_embedding = nn.Parameter(torch.zeros(config.dim))
            self.head = nn.Linear(config.dim, config.input_dim)
        else:
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        cos, sin = _rope_tables(config.head_dim, config.max_len, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        if self.continuous:
            nn.init.normal_(self.mask_embedding, std=0.02)

    @staticmethod
    def _init(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A zeroed KV cache for ``batch_size`` rows and positions 0..max_len-1."""
        p = self.head.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def hidden_states(self, x, *, mask=None, cache=None, start: int = 0, positions=None,
                      masked=None, keep=None):
        """The final normalised hidden states [B, t, dim] ([B, keep, dim] with ``keep``).

        Args:
            x: int64 tokens [B, t]; for the continuous task float vectors [B, t, input_dim].
            mask: a MaskSpec for this call (q_offset already set); None = full attention.
            cache: None or a :class:`KVCache` from :meth:`new_cache`.
            start: position of x[:, 0] (where the call writes into the cache).
            positions: int64 [t] or [B, t] RoPE positions, each < max_len; default
                start..start+t-1. BD3 training gives both halves of [x_t | x_0] the positions
                0..n-1. On CUDA an out-of-range position fails as a device-side assert.
            masked: continuous task only, bool [B, t]: vectors replaced by the mask embedding.
            keep: None, or the number of leading positions whose states are returned. The last
                layer then computes queries, attention output and feed-forward for those only
                (the other positions still give it their keys and values): BD3 training keeps
                the x_t half, whose loss never reads the x_0 half's last-layer outputs.
        """
        if self.continuous:
            if x.dim() != 3 or x.shape[-1] != self.config.input_dim or not x.is_floating_point():
                raise ValueError(
                    f"x must be float [B, t, {self.config.input_dim}], got {x.dtype} "
                    f"{tuple(x.shape)}")
            h = self.read_in(x)
            if masked is not None:
                h = torch.where(masked.unsqueeze(-1), self.mask_embedding.to(h.dtype), h)
        else:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"tokens must be int64 [B, t], got {x.dtype} {tuple(x.shape)}")
            try:  # bounds checked by the lookup (a device assert on CUDA), as for positions
                h = self.tok_embeddings(x)
            except IndexError:
                raise ValueError(f"tokens must be in [0, vocab_size={self.config.vocab_size}), "
                                 f"got [{int(x.min())}, {int(x.max())}]") from None
        B, t = x.shape[:2]
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache has batch size {cache.batch_size}, tokens have {B}")
            if start + t > cache.max_len:
                raise ValueError(
                    f"start + t = {start + t} exceeds the cache length {cache.max_len}")
        if positions is None:
            if start + t > self.config.max_len:
                raise ValueError(
                    f"positions up to {start + t} exceed max_len={self.config.max_len}")
            cos = self.rope_cos[start:start + t].unsqueeze(0)
            sin = self.rope_sin[start:start + t].unsqueeze(0)
        else:
            positions = positions if positions.dim() == 2 else positions.unsqueeze(0)
            try:
                # The index kernel checks the bounds (a device assert on CUDA): reading the
                # positions here would make every call wait for the device.
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            except IndexError:
                raise ValueError(f"positions must be < max_len={self.config.max_len}") from None
        if keep is not None and not (isinstance(keep, int) and 0 < keep <= t):
            raise ValueError(f"keep must be None or an int in [1, {t}], got {keep!r}")
        if mask is None:
            mask = masks.full(q_offset=start)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, start, keep if i == last else None)
        return self.norm(h)

    def forward(self, x, *, mask=None, cache=None, start: int = 0, positions=None, masked=None):
        """Logits [B, t, V] (continuous: predictions [B, t, input_dim]); see hidden_states."""
        h = self.hidden_states(x, mask=mask, cache=cache, start=start, positions=positions,
                               masked=masked)
        return self.head(h)

    def token_loss(self, hidden, targets, weights, *, focal_gamma: float = 0.0, rows=None):
        """Sum over selected rows of weights * cross-entropy, without building the logits.

        Args:
            hidden: [B, t, dim] from :meth:`hidden_states`
            targets: int64 [B, t] (-100: not in the loss)
            weights: float [B, t] (0: not in the loss)
            rows: int64 [n] or None: ascending flattened indices of every position in the loss
                (the caller's promise that all others have weight 0 or target -100). Spares the
                kernel finding them (a host sync on CUDA); ignored by a kernel library without
                the ``rows`` argument.
        """
        extra = {"rows": rows} if rows is not None and "rows" in _CE_KEYWORDS else {}
        return bk.linear_masked_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.head.weight, targets.reshape(-1),
            weights.reshape(-1).float(), reduction="sum", focal_gamma=focal_gamma, **extra)

    def vector_loss(self, hidden, targets, weights):
        """Sum over rows of weights * squared error of the read-out, summed over the d dims.

        Args:
            hidden: [B, t, dim]; targets: float [B, t, input_dim]; weights: float [B, t].
        """
        pred = self.head(hidden).float()
        return ((pred - targets.float()).pow(2).sum(-1) * weights.float()).sum()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory) -> None:
        """Writes config.json and model.safetensors (the state dict; no pickled code)."""
        os.makedirs(directory, exist_ok=True)
        # safetensors refuses tensors that share storage and needs them contiguous; the state
        # dict of this model has no shared tensors.
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        _atomic_save_safetensors(state, os.path.join(directory, WEIGHTS_NAME))
        # Written last: config.json marks a complete save (run folders are read by that).
        _atomic_write_text(os.path.join(directory, "config.json"),
                           json.dumps(dataclasses.asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> Transformer:
        """Loads what :meth:`save_pretrained` wrote: config.json with model.safetensors, or with
        model.pt (the earlier format, read with ``weights_only=True``). Never executes code from
        the files. Raises ValueError on unknown config fields, missing or unexpected tensors and
        tensors of the wrong shape."""
        directory = os.fspath(directory)
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"directory must hold a saved model: {config_path} does not exist")
        with open(config_path) as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise ValueError(f"{config_path} must hold a JSON object of ModelConfig fields")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"config.json has unknown fields {unknown}")
        model = cls(ModelConfig(**fields))
        state = _read_weights(directory, map_location)
        _check_state(model.state_dict(), state, directory)
        model.load_state_dict(state)
        return model


WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "model.pt"


def _read_weights(directory: str, map_location) -> dict:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        device = map_location if isinstance(map_location, str) else str(map_location or "cpu")
        return load_file(path, device=device)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location=map_location, weights_only=True)
    raise ValueError(f"{directory} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def _check_state(expected: dict, state: dict, directory: str) -> None:
    """ValueError naming every missing, unexpected or mis-shaped tensor (load_state_dict's own
    message is a RuntimeError that buries the shapes in a long list)."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name in sorted(set(expected) & set(state)):
        if not isinstance(state[name], torch.Tensor):
            problems.append(f"{name} is a {type(state[name]).__name__}, not a tensor")
        elif tuple(state[name].shape) != tuple(expected[name].shape):
            problems.append(f"{name} has shape {tuple(state[name].shape)}, the config expects "
                            f"{tuple(expected[name].shape)}")
    if problems:
        raise ValueError(f"weights in {directory} do not match its config.json: "
                         + "; ".join(problems))


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_save_safetensors(state: dict, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)

