"""The frontalizer: a Transformer encoder that predicts a residual correction to the profile embedding.

Output = L2-normalise(src_emb + g * R). R comes from a readout token through a
last Linear layer initialised to zero, so an untrained model returns exactly
the do-nothing baseline normalise(src_emb) and training starts from it rather
than from noise (DREAM's residual block). g is a fusion weight: learned from
pose and landmarks (FSPFM), DREAM's fixed yaw gate, or 1.

Token sequence: the source embedding (one token, or ``emb_chunks`` chunk
tokens), the landmarks after `geometry.normalize_keypoints` (one token, one per
facial part, or one per point), one pose token (`geometry.encode_pose`) and a
learned readout token, each tagged with a token-type embedding.

Constraints it is built for: DeepSpeed ZeRO-3 (every parameter is created in
``__init__`` and used only inside the forward of the module that owns it, no
Python branches on tensor values), ONNX export (opset >= 17, dynamic batch) and
fp16/bf16 autocast (landmark and pose encodings and the final normalisation run
in float32). Build it outside ``deepspeed.zero.Init`` (the runtime passes
``zero3_init_flag=False``): ``nn.TransformerEncoder`` deep-copies its layer, and
copies of already partitioned parameters lose their sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import ModelConfig
from dist_train.data.schema import EMB_DIM, MODEL_INPUTS, N_LANDMARKS
from dist_train.geometry import LANDMARK_PARTS, dream_yaw_gate, encode_pose, normalize_keypoints

POSE_FEATURES = 6  # encode_pose: sin and cos of pitch, yaw, roll
TOKEN_TYPES = ("embedding", "landmarks", "pose", "readout")
GATE_HIDDEN = 64


class ZeroInitLinear(nn.Linear):
    """A Linear layer that starts at zero (weight and bias), so its output starts at exactly 0.

    Zeroed in ``reset_parameters``, so any re-initialisation keeps the identity start.
    """

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class EmbeddingTokens(nn.Module):
    """The source embedding as one token (``whole``) or as chunk tokens with chunk-ID embeddings (``chunked``)."""

    def __init__(self, layout: str, chunks: int, d_model: int):
        super().__init__()
        self.layout = layout
        if layout == "whole":
            self.count = 1
            self.proj = nn.Linear(EMB_DIM, d_model)
        elif layout == "chunked":
            if chunks <= 0 or EMB_DIM % chunks:
                raise ValueError(f"emb_chunks: {chunks} must be a positive divisor of {EMB_DIM}")
            self.count = chunks
            self.proj = nn.Linear(EMB_DIM // chunks, d_model)
            self.chunk_id = nn.Embedding(chunks, d_model)
            self.register_buffer("chunk_index", torch.arange(chunks), persistent=False)
        else:
            raise ValueError(f"emb_tokens: {layout!r} is not valid; expected 'whole' or 'chunked'")

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if self.layout == "whole":
            return self.proj(emb).unsqueeze(1)
        chunks = emb.unflatten(-1, (self.count, EMB_DIM // self.count))
        return self.proj(chunks) + self.chunk_id(self.chunk_index)


class LandmarkTokens(nn.Module):
    """Normalised landmarks as one token, one token per facial part, or 68 point tokens with landmark-ID embeddings."""

    def __init__(self, layout: str, d_model: int):
        super().__init__()
        self.layout = layout
        if layout == "one":
            self.count = 1
            self.proj = nn.Linear(N_LANDMARKS * 3, d_model)
        elif layout == "parts":
            self.count = len(LANDMARK_PARTS)
            self.parts = list(LANDMARK_PARTS.values())
            self.part_proj = nn.ModuleList(nn.Linear((end - start) * 3, d_model) for start, end in self.parts)
        elif layout == "points":
            self.count = N_LANDMARKS
            self.proj = nn.Linear(3, d_model)
            self.landmark_id = nn.Embedding(N_LANDMARKS, d_model)
            self.register_buffer("landmark_index", torch.arange(N_LANDMARKS), persistent=False)
        else:
            raise ValueError(f"landmark_tokens: {layout!r} is not valid; expected 'one', 'parts' or 'points'")

    def forward(self, kps: torch.Tensor) -> torch.Tensor:
        if self.layout == "one":
            return self.proj(kps.flatten(-2)).unsqueeze(1)
        if self.layout == "parts":
            return torch.stack(
                [proj(kps[:, start:end].flatten(-2)) for proj, (start, end) in zip(self.part_proj, self.parts)], dim=1
            )
        return self.proj(kps) + self.landmark_id(self.landmark_index)


class ResidualHead(nn.Module):
    """Readout state -> residual R (512) through a zero-initialised last layer.

    ``use_mlp`` (the default) adds a head that also sees the source embedding:
    R = W_out((W_in src) * gamma(readout)), a linear map of src whose
    coefficients the readout (pose, landmarks, context) chooses. Measured on the
    synthetic pose-distortion benchmark, a readout-only linear head cannot learn
    a pose-dependent linear map of a 512-d embedding through a d_model
    bottleneck (no gain after 3 epochs), while this head learns it.
    """

    def __init__(self, d_model: int, use_mlp: bool, hidden: int = EMB_DIM):
        super().__init__()
        self.use_mlp = use_mlp
        if use_mlp:
            self.src_in = nn.Linear(EMB_DIM, hidden, bias=False)
            self.gamma = nn.Linear(d_model, hidden)
        self.out = ZeroInitLinear(hidden if use_mlp else d_model, EMB_DIM)

    def forward(self, readout: torch.Tensor, src_emb: torch.Tensor) -> torch.Tensor:
        if self.use_mlp:
            readout = self.src_in(src_emb.to(readout.dtype)) * self.gamma(readout)
        return self.out(readout)


class LearnedGate(nn.Module):
    """g = sigmoid(MLP(pose features, normalised landmarks)): the model learns how much correction each pose needs."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(POSE_FEATURES + N_LANDMARKS * 3, GATE_HIDDEN), nn.GELU(), nn.Linear(GATE_HIDDEN, 1)
        )

    def forward(self, pose_deg: torch.Tensor, pose_feat: torch.Tensor, kps: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(torch.cat([pose_feat, kps.flatten(-2)], dim=-1)))


class YawGate(nn.Module):
    """DREAM's fixed gate on |yaw| (`geometry.dream_yaw_gate`): no correction for frontal faces."""

    def forward(self, pose_deg: torch.Tensor, pose_feat: torch.Tensor, kps: torch.Tensor) -> torch.Tensor:
        return dream_yaw_gate(pose_deg)


def check_inputs(src_emb: torch.Tensor, src_kps: torch.Tensor, src_pose: torch.Tensor) -> None:
    """Raise ValueError naming the input whose per-sample shape is wrong (shapes only, never values).

    Skipped while tracing for ONNX export: the graph's input shapes are checked by the runtime.
    """
    if torch.jit.is_tracing():
        return
    expected = {"src_emb": (EMB_DIM,), "src_kps": (N_LANDMARKS, 3), "src_pose": (3,)}
    tensors = {"src_emb": src_emb, "src_kps": src_kps, "src_pose": src_pose}
    for name, t in tensors.items():
        if t.dim() != len(expected[name]) + 1 or tuple(t.shape[1:]) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected (batch, {', '.join(map(str, expected[name]))})"
            )
    if not (src_emb.shape[0] == src_kps.shape[0] == src_pose.shape[0]):
        raise ValueError(
            f"batch sizes differ: src_emb {src_emb.shape[0]}, src_kps {src_kps.shape[0]}, src_pose {src_pose.shape[0]}"
        )


class FrontalNet(nn.Module):
    """(src_emb (B,512), src_kps (B,68,3) landmark_3d_68 pixels, src_pose (B,3) degrees) -> (B,512) unit, float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.emb_tokens = EmbeddingTokens(cfg.emb_tokens, cfg.emb_chunks, d)
        self.landmark_tokens = LandmarkTokens(cfg.landmark_tokens, d)
        self.pose_token = nn.Linear(POSE_FEATURES, d)
        self.readout_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        kinds = [0] * self.emb_tokens.count + [1] * self.landmark_tokens.count + [2, 3]
        self.register_buffer("token_type_index", torch.tensor(kinds), persistent=False)
        self.token_type = nn.Embedding(len(TOKEN_TYPES), d)
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.nhead,
            cfg.dim_feedforward,
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.residual = ResidualHead(d, cfg.residual_mlp)
        gates = {"learned": LearnedGate, "yaw": YawGate, "none": None}
        if cfg.gate not in gates:
            raise ValueError(f"gate: {cfg.gate!r} is not valid; expected one of {list(gates)}")
        self.gate = gates[cfg.gate]() if gates[cfg.gate] else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_type_index)

    def forward(self, src_emb: torch.Tensor, src_kps: torch.Tensor, src_pose: torch.Tensor) -> torch.Tensor:
        check_inputs(src_emb, src_kps, src_pose)
        # geometry encodes in float32 (squared pixel offsets overflow fp16); the
        # network then runs in the embedding's dtype (fp16 when DeepSpeed casts inputs).
        kps = normalize_keypoints(src_kps).to(src_emb.dtype)
        pose_feat = encode_pose(src_pose).to(src_emb.dtype)
        tokens = torch.cat(
            [
                self.emb_tokens(src_emb),
                self.landmark_tokens(kps),
                self.pose_token(pose_feat).unsqueeze(1),
                self.readout_token.expand(src_emb.shape[0], -1, -1).to(src_emb.dtype),
            ],
            dim=1,
        )
        tokens = tokens + self.token_type(self.token_type_index)
        readout = self.encoder(tokens)[:, -1]
        residual = self.residual(readout, src_emb).float()
        if self.gate is not None:
            residual = self.gate(src_pose.float(), pose_feat, kps).float() * residual
        return F.normalize(src_emb.float() + residual, dim=-1)

    def describe(self) -> str:
        """One line for logs: layout, sizes and parameter count (ZeRO-3 aware)."""
        c = self.cfg
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        return (
            f"FrontalNet: {self.num_tokens} tokens (emb {c.emb_tokens} x{self.emb_tokens.count}, "
            f"landmarks {c.landmark_tokens} x{self.landmark_tokens.count}, pose, readout), "
            f"d_model {c.d_model}, layers {c.num_layers}, heads {c.nhead}, ff {c.dim_feedforward}, "
            f"dropout {c.dropout:g}, residual {'modulated' if c.residual_mlp else 'linear'}, gate {c.gate}, "
            f"params {n_params / 1e6:.2f}M"
        )


def build_model(cfg: ModelConfig) -> FrontalNet:
    """The model a config describes; the one constructor the trainer, eval and export use."""
    return FrontalNet(cfg)


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes of the model a config describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def model_inputs(batch: dict[str, torch.Tensor], emb_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(src_emb, src_kps, src_pose) from a batch: only the embedding in ``emb_dtype`` (the module's dtype).

    Landmarks are image pixels (thousands): in fp16 they lose whole pixels above 2048 and overflow
    above 65504, so they and the pose reach the model in fp32 and are normalised there.
    """
    emb, kps, pose = (batch[name] for name in MODEL_INPUTS)
    return emb.to(emb_dtype), kps.float(), pose.float()
