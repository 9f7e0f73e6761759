"""The frontalizer: identity start, input invariances, size variants, precision, ONNX export, that it learns, and
what its gates compute after training."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from dist_train.config import LossConfig, ModelConfig, OptimConfig
from dist_train.data.schema import MODEL_INPUTS
from dist_train.export import export_onnx
from dist_train.geometry import dream_yaw_gate, mean_shape, rotation_matrices
from dist_train.losses import FrontalLoss
from dist_train.model import build_model
from dist_train.schedule import lr_at

TINY = dict(d_model=32, nhead=2, num_layers=1, dim_feedforward=64)
LAYOUTS = list(
    itertools.product(("whole", "chunked"), ("one", "parts", "points"), ("learned", "yaw", "none"), (False, True))
)


@pytest.fixture(autouse=True)
def one_thread():
    """These small models run faster on one thread; two threads contending with other processes for the 2 cores
    ran the 768-dim forward pass 15x slower here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def face_landmarks(pose: torch.Tensor, scale: float = 150.0, centre=(320.0, 240.0, 0.0)) -> torch.Tensor:
    """landmark_3d_68-like pixels: the InsightFace mean shape rotated by ``pose`` (degrees), scaled, placed."""
    R = torch.from_numpy(rotation_matrices(pose.numpy())).float()
    return torch.from_numpy(mean_shape()).float() @ R.transpose(1, 2) * scale + torch.tensor(centre)


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pose = torch.stack(
        [torch.randn(n, generator=g) * 10, (torch.rand(n, generator=g) * 2 - 1) * 90, torch.randn(n, generator=g) * 5],
        -1,
    )
    emb = torch.randn(n, 512, generator=g) * 3.0  # deliberately not unit length
    return emb, face_landmarks(pose), pose


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised output layer weights, as training would, so the residual is not zero."""
    torch.manual_seed(1)
    torch.nn.init.normal_(model.residual.out.weight, std=0.2)
    return model


@pytest.mark.parametrize("emb_tokens,landmark_tokens,gate,residual_mlp", LAYOUTS)
def test_untrained_model_returns_the_identity_baseline(emb_tokens, landmark_tokens, gate, residual_mlp):
    torch.manual_seed(0)
    cfg = ModelConfig(
        **TINY,
        dropout=0.1,
        emb_tokens=emb_tokens,
        landmark_tokens=landmark_tokens,
        gate=gate,
        residual_mlp=residual_mlp,
    )
    model = build_model(cfg).train()  # dropout active: the start must still be exact
    emb, kps, pose = inputs(6)
    pred = model(emb, kps, pose)
    assert pred.shape == (6, 512) and pred.dtype == torch.float32
    assert (pred - F.normalize(emb, dim=-1)).abs().max().item() < 1e-6
    # and the residual is wired in: a non-zero output layer moves the prediction
    assert (trained_like(model).eval()(emb, kps, pose) - F.normalize(emb, dim=-1)).abs().max().item() > 1e-3


@pytest.mark.parametrize("landmark_tokens", ["one", "parts", "points"])
def test_prediction_ignores_landmark_position_and_scale_but_not_shape(landmark_tokens):
    model = trained_like(build_model(ModelConfig(**TINY, dropout=0.0, landmark_tokens=landmark_tokens))).eval()
    emb, kps, pose = inputs(4)
    with torch.no_grad():
        pred = model(emb, kps, pose)
        moved = model(emb, kps * 3.7 + torch.tensor([900.0, -150.0, 40.0]), pose)
        other_face = model(emb, face_landmarks(pose + torch.tensor([0.0, 30.0, 0.0])), pose)
    assert (moved - pred).abs().max().item() < 1e-6
    assert (other_face - pred).abs().max().item() > 1e-4  # about 100x the moved difference's bound


@pytest.mark.parametrize(
    "d_model,num_layers,nhead,dim_feedforward",
    [(512, 4, 8, 2048), (768, 6, 8, 3072), (768, 8, 8, 3072), (768, 8, 16, 3072)],
)
def test_design_note_variants_build_and_train(d_model, num_layers, nhead, dim_feedforward):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, num_layers=num_layers, nhead=nhead, dim_feedforward=dim_feedforward, dropout=0.2)
    model = build_model(cfg)
    d, ff = d_model, dim_feedforward
    per_layer = 4 * d * d + 2 * d * ff + 9 * d + ff  # attention, feed-forward, 2 LayerNorms
    encoder = sum(p.numel() for p in model.encoder.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert encoder == num_layers * per_layer + 2 * d
    assert encoder < total < 1.1 * encoder  # tokenisers, gate and head are small next to the encoder
    assert f"params {total / 1e6:.2f}M" in model.describe()
    assert f"d_model {d_model}, layers {num_layers}, heads {nhead}" in model.describe()

    emb, kps, pose = inputs(2)
    trained_like(model)
    pred = model(emb, kps, pose)
    assert pred.shape == (2, 512)
    assert torch.allclose(pred.norm(dim=-1), torch.ones(2), atol=1e-5)
    FrontalLoss(LossConfig())(pred, F.normalize(torch.randn(2, 512), dim=-1), torch.tensor([0, 1]))[0].backward()
    # every parameter takes part in the loss (DDP requires it) and gets a finite gradient
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_wrong_input_shape_is_named():
    model = build_model(ModelConfig(**TINY))
    emb, kps, pose = inputs(3)
    with pytest.raises(ValueError, match=r"src_kps has shape \(3, 68, 2\), expected \(batch, 68, 3\)"):
        model(emb, kps[..., :2], pose)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(emb, kps[:2], pose)


def test_fp16_model_keeps_landmarks_of_large_faces():
    """Squared pixel offsets of a big face overflow fp16; landmarks must still reach the model."""
    model = trained_like(build_model(ModelConfig(**TINY, dropout=0.0))).eval()
    emb, _, pose = inputs(2)
    pose = pose.half()
    big_face = face_landmarks(pose.float(), scale=900.0, centre=(1900.0, 1000.0, 0.0)).half()
    other = face_landmarks(
        pose.float() + torch.tensor([0.0, 25.0, 0.0]), scale=900.0, centre=(1900.0, 1000.0, 0.0)
    ).half()
    half = model.half()
    with torch.no_grad():
        a, b = half(emb.half(), big_face, pose), half(emb.half(), other, pose)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    # normalised in fp16, both faces would become all zeros and give identical predictions
    assert (a - b).abs().max().item() > 1e-4


def test_bf16_autocast_starts_at_baseline_and_runs_trained():
    emb, kps, pose = inputs(3)
    model = build_model(ModelConfig(**TINY))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        start = model(emb, kps, pose)
        trained = trained_like(model)(emb, kps, pose)
    assert (start - F.normalize(emb, dim=-1)).abs().max().item() < 1e-6
    assert trained.dtype == torch.float32 and torch.isfinite(trained).all()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "layout", [{}, dict(emb_tokens="chunked", landmark_tokens="points", gate="yaw", residual_mlp=True)]
)
def test_onnx_export_matches_torch_for_any_batch_size(layout, tmp_path):
    model = trained_like(build_model(ModelConfig(d_model=64, nhead=4, num_layers=2, dim_feedforward=128, **layout)))
    path = export_onnx(model, tmp_path / "model.onnx")  # the project's export: opset 17, dynamic batch
    assert max(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = inputs(5, seed=3)  # exported with a batch of 2
    (got,) = session.run(None, {name: t.numpy() for name, t in zip(MODEL_INPUTS, batch)})
    with torch.no_grad():
        want = model.eval()(*batch).numpy()
    assert got.shape == (5, 512)
    assert np.abs(got - want).max() < 1e-4


def rotated_pairs(n: int, gen: torch.Generator, basis: torch.Tensor, speeds: torch.Tensor, yaw_power: int = 1):
    """Frontal targets and profiles made by rotating them in fixed 2-D planes by angles growing with yaw.

    ``yaw_power`` 1: angle proportional to yaw; 2: to yaw * |yaw| / 90, so a profile needs a large correction
    (90 deg * speed at |yaw| = 90) and a frontal face almost none (1.1 deg * speed at 10 deg).
    """
    z = torch.randn(n, 512, generator=gen) * 0.02 + (torch.randn(n, basis.shape[1], generator=gen) * 0.3) @ basis.T
    tgt = F.normalize(z, dim=-1)
    yaw = (torch.rand(n, generator=gen) * 2 - 1) * 90
    pose = torch.stack([torch.randn(n, generator=gen) * 5, yaw, torch.randn(n, generator=gen) * 3], -1)
    coords = tgt @ basis
    a, b = coords[:, 0::2], coords[:, 1::2]
    angle = torch.deg2rad(yaw)[:, None] * (yaw.abs()[:, None] / 90) ** (yaw_power - 1) * speeds
    rotated = torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(1)
    src = tgt + (rotated - coords) @ basis.T
    return src, face_landmarks(pose), pose, tgt


def test_learns_a_pose_dependent_rotation():
    """Sanity: 80 steps on 256 samples lift cos well above the do-nothing baseline, also on unseen samples."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    planes = 8
    basis, _ = torch.linalg.qr(torch.randn(512, 2 * planes, generator=gen))
    speeds = torch.linspace(0.6, 1.0, planes)
    train, held_out = rotated_pairs(256, gen, basis, speeds), rotated_pairs(256, gen, basis, speeds)

    model = build_model(ModelConfig(d_model=64, nhead=4, num_layers=2, dim_feedforward=128, dropout=0.0))
    loss_fn = FrontalLoss(LossConfig(mse_weight=0.1, cosine_weight=0.9))
    optim = OptimConfig(lr=3e-3, warmup_lr=1e-5, warmup_epochs=2, cosine_eta_min=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=0.0)
    batch, epochs = 64, 20
    steps_per_epoch = 256 // batch
    step = 0
    for _ in range(epochs):
        for i in range(0, 256, batch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, optim, steps_per_epoch, epochs * steps_per_epoch)
            rows = slice(i, i + batch)
            loss, _ = loss_fn(model(*(t[rows] for t in train[:3])), train[3][rows], torch.arange(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1

    model.eval()
    with torch.no_grad():
        for split in (train, held_out):
            src, kps, pose, tgt = split
            baseline = F.cosine_similarity(src, tgt).mean().item()
            learned = F.cosine_similarity(model(src, kps, pose), tgt).mean().item()
            assert baseline < 0.82
            assert learned > baseline + 0.1, (learned, baseline)  # measured: 0.79 -> 0.99


def train_gated(gate: str, steps: int = 300):
    """A tiny frontalizer trained (cosine loss, Adam) on `rotated_pairs(..., yaw_power=2)`; returns it and held-out samples."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(512, 8, generator=gen))
    speeds = torch.linspace(0.6, 1.0, 4)
    train = rotated_pairs(512, gen, basis, speeds, yaw_power=2)
    model = build_model(ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=0.0, gate=gate))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        rows = torch.randint(0, 512, (64,), generator=gen)
        pred = model(*(t[rows] for t in train[:3]))
        loss = (1 - F.cosine_similarity(pred, train[3][rows])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), rotated_pairs(512, gen, basis, speeds, yaw_power=2)


def gate_and_residual(model, src, kps, pose):
    """The prediction together with the gate g and the residual R the forward pass computed."""
    seen = {}
    hooks = [
        model.gate.register_forward_hook(lambda _m, _i, out: seen.__setitem__("g", out)),
        model.residual.register_forward_hook(lambda _m, _i, out: seen.__setitem__("R", out)),
    ]
    try:
        with torch.no_grad():
            pred = model(src, kps, pose)
    finally:
        for h in hooks:
            h.remove()
    return pred, seen["g"], seen["R"]


def correction_by_yaw(model, src, kps, pose) -> tuple[float, float]:
    """Mean |pred - normalise(src)| over frontal (|yaw| < 10) and profile (|yaw| > 60) samples."""
    with torch.no_grad():
        corr = (model(src, kps, pose) - F.normalize(src, dim=-1)).norm(dim=-1)
    yaw = pose[:, 1].abs()
    return corr[yaw < 10].mean().item(), corr[yaw > 60].mean().item()


def pose_grid() -> torch.Tensor:
    yaw = torch.tensor([-90.0, -67.5, -45.0, -22.5, 0.0, 22.5, 45.0, 67.5, 90.0])
    return torch.stack(
        [
            torch.cartesian_prod(yaw, torch.tensor([-30.0, 0.0, 30.0]), torch.tensor([-20.0, 20.0]))[:, i]
            for i in (1, 0, 2)
        ],
        -1,
    )  # (54, 3) pitch, yaw, roll


def test_trained_yaw_gate_is_dreams_fixed_gate():
    model, (src, kps, pose, tgt) = train_gated("yaw")
    # a fixed function: nothing to train, nothing in the checkpoint
    assert list(model.gate.parameters()) == [] and list(model.gate.buffers()) == []
    assert not any(k.startswith("gate.") for k in model.state_dict())

    # sigmoid(10 (|yaw| / 45 - 1)) by hand: yaw 0 -> s(-10), 22.5 -> s(-5), 36 -> s(-2), 45 -> s(0), 54 -> s(2),
    # 67.5 -> s(5), 90 -> s(10); negative yaws alike; pitch, roll and landmarks do not matter
    yaw = torch.tensor([0.0, 22.5, -22.5, 36.0, 45.0, -45.0, 54.0, 67.5, 90.0, -90.0])
    want = torch.tensor([4.5397869e-05, 0.0066928509, 0.0066928509, 0.11920292, 0.5, 0.5, 0.88079708, 0.99330715])
    want = torch.cat([want, torch.tensor([0.99995460, 0.99995460])])
    n = len(yaw)
    pose_q = torch.stack([torch.linspace(-30, 30, n), yaw, torch.linspace(20, -20, n)], -1)
    emb = torch.randn(n, 512)
    pred, g, R = gate_and_residual(model, emb, face_landmarks(pose_q + torch.tensor([5.0, 10.0, 0.0])), pose_q)
    assert g.shape == (n, 1)
    torch.testing.assert_close(g[:, 0], want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, dream_yaw_gate(pose_q))
    # output = normalise(src + g R), unit length
    torch.testing.assert_close(pred, F.normalize(emb + g * R, dim=-1))
    assert torch.allclose(pred.norm(dim=-1), torch.ones(n), atol=1e-5)
    assert R.abs().max() > 0.1  # trained: the residual is not the zero it starts at

    # DREAM's promise: (almost) no correction for frontal faces, the full one for profiles
    frontal, profile = correction_by_yaw(model, src, kps, pose)
    assert frontal < 1e-3 and profile > 0.3, (frontal, profile)  # measured: 3e-5, 0.67


def test_trained_learned_gate_is_a_pose_dependent_weight_in_0_1():
    model, (src, kps, pose, tgt) = train_gated("learned")
    with torch.no_grad():
        baseline = F.cosine_similarity(src, tgt).mean().item()
        learned = F.cosine_similarity(model(src, kps, pose), tgt).mean().item()
    assert learned > baseline + 0.05, (learned, baseline)  # it trained: measured 0.89 -> 0.998

    poses = pose_grid()
    emb = torch.randn(len(poses), 512)
    pred, g, R = gate_and_residual(model, emb, face_landmarks(poses), poses)
    assert g.shape == (len(poses), 1)
    assert ((g > 0) & (g < 1)).all(), g.min().item()  # a sigmoid: strictly inside (0, 1)
    torch.testing.assert_close(pred, F.normalize(emb + g * R, dim=-1))
    assert torch.allclose(pred.norm(dim=-1), torch.ones(len(poses)), atol=1e-5)

    # g depends on pose and landmarks only: another source embedding gives the same gate
    _, g_other, _ = gate_and_residual(model, torch.randn(len(poses), 512), face_landmarks(poses), poses)
    torch.testing.assert_close(g_other, g)
    # ... and on the landmarks, not on the pose input alone: another face shape for the same stated pose moves g
    _, g_shape, _ = gate_and_residual(model, emb, face_landmarks(poses + torch.tensor([0.0, 30.0, 0.0])), poses)
    assert (g_shape - g).abs().max() > 1e-4

    # it learned how much correction each pose needs: profiles get a larger gate than frontal faces
    yaw = poses[:, 1].abs()
    g_frontal, g_profile = g[yaw == 0].mean().item(), g[yaw == 90].mean().item()
    assert g_profile > 3 * g_frontal, (g_frontal, g_profile)  # measured: 0.05 -> 0.43 at -90, 0.80 at +90
    for sign in (-1.0, 1.0):
        side = (poses[:, 1] == 90 * sign).nonzero()[:, 0]
        assert g[side].mean() > 2 * g_frontal, (sign, g[side].mean().item(), g_frontal)
    frontal, profile = correction_by_yaw(model, src, kps, pose)
    assert profile > 10 * frontal, (frontal, profile)  # measured: 0.02 -> 0.7
