"""The shipped reference digits models: loading, sampling and the quality metrics (mechanics, not quality)."""
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffaccel.integrations import reference as ref  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    return ref.load_classifier()


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_pipeline_loads_and_samples(kind):
    pipe = ref.load_reference_pipeline(kind)
    assert isinstance(pipe, ref.DigitsPipeline)
    assert (pipe.unet is not None) == (kind == "unet") and (pipe.transformer is not None) == (kind == "dit")
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    images = pipe(prompts, num_inference_steps=3, generator=ref.sample_generators([5, 6]))
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()
    # per-sample generators: a sample depends only on its own seed, not on the batch it is drawn in
    alone = pipe(prompts[1:], num_inference_steps=3, generator=ref.sample_generators([6]))
    torch.testing.assert_close(alone[0], images[1], rtol=0, atol=1e-5)
    raw = pipe(prompts[1:], num_inference_steps=3, generator=ref.sample_generators([6]), output_type="latent")
    torch.testing.assert_close((raw.clamp(-1, 1) + 1) / 2, alone, rtol=0, atol=1e-5)
    # the prompt reaches the output
    other = pipe(["a handwritten digit zero"], num_inference_steps=3, generator=ref.sample_generators([6]))
    assert (other - alone).abs().max() > 1e-3


def test_pipeline_rejects_bad_input():
    pipe = ref.load_reference_pipeline("unet")
    with pytest.raises(ValueError, match="prompt"):
        pipe([], num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(["a handwritten digit one"], num_inference_steps=0)
    with pytest.raises(ValueError, match="latents"):
        pipe(["a handwritten digit one"], num_inference_steps=2, latents=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="output_type"):
        pipe(["a handwritten digit one"], num_inference_steps=2, output_type="pil")
    with pytest.raises(ValueError, match="kind"):
        ref.load_reference_pipeline("vae")


def test_tokenizer_has_bos_eos_and_pads():
    tok = ref.load_tokenizer()
    ids = tok(["a handwritten digit seven", ""], padding="max_length", max_length=tok.model_max_length).input_ids
    assert ids[0][0] == tok.bos_token_id and ids[0][5] == tok.eos_token_id and ids[0][6:] == [tok.pad_token_id] * 2
    assert ids[1][:2] == [tok.bos_token_id, tok.eos_token_id]
    assert tok.unk_token_id not in ids[0]


def test_ssim_and_psnr():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g)
    torch.testing.assert_close(ref.ssim(x, x), torch.ones(3, dtype=torch.float64))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ref.ssim(noisy, x)
    assert (s < 0.95).all() and (s > -1).all()
    torch.testing.assert_close(s, ref.ssim(x, noisy))  # symmetric
    # constant images: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    const = lambda v: torch.full((1, 1, 16, 16), v, dtype=torch.float64)
    torch.testing.assert_close(ref.ssim(const(a), const(b)).item(),
                               expected, rtol=1e-9, atol=1e-9)
    # PSNR: a uniform error of 0.1 on a range of 1 is 20 dB; identical images hit the 100 dB cap
    torch.testing.assert_close(ref.psnr(torch.full((2, 1, 4, 4), 0.1), torch.zeros(2, 1, 4, 4)),
                               torch.full((2,), 20.0, dtype=torch.float64))
    assert ref.psnr(x, x).eq(100.0).all()
    with pytest.raises(ValueError, match="images, reference"):
        ref.ssim(x, x[:2])
    with pytest.raises(ValueError, match="images"):
        ref.ssim(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))


def test_frechet_distance():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    assert ref.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(8, dtype=torch.float64) / 4
    # same covariance, shifted mean: the distance is |shift|^2
    assert ref.frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)
    b = torch.randn(200, 8, generator=g, dtype=torch.float64) * 2
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    covmean = scipy_linalg.sqrtm(ca.numpy() @ cb.numpy()).real
    expected = (mu_a - mu_b).square().sum().item() + (ca.trace() + cb.trace()).item() - 2 * covmean.trace()
    assert ref.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="features_a, features_b"):
        ref.frechet_distance(a, b[:, :4])


def test_classifier_and_prompt_accuracy(classifier):
    real, labels = ref.real_digit_images()
    images, labels = real[:200], labels[:200]
    assert ref.prompt_accuracy(classifier, images, labels) > 0.9
    assert ref.prompt_accuracy(classifier, images, (labels + 1) % 10) < 0.1
    preds, feats = ref.classify(classifier, images[:5])
    assert preds.shape == (5,) and feats.shape == (5, classifier.config.feature_dim)
    with pytest.raises(ValueError, match="digits"):
        ref.prompt_accuracy(classifier, images, labels[:10])


def test_digit_prompts_and_weight_bytes():
    prompts, digits = ref.digit_prompts(23)
    assert prompts[7] == "a handwritten digit seven" and prompts[17] == prompts[7] and digits[13] == 3
    assert ref.weight_bytes(torch.nn.Linear(4, 3)) == (12 + 3) * 4
    lin = torch.nn.Linear(4, 3)
    shared = torch.nn.Sequential(lin, lin)  # tied modules are counted once
    assert ref.weight_bytes(shared) == 60


def test_demo_runs_with_a_given_accelerator(tmp_path, monkeypatch):
    from diffaccel import _demo

    calls = []

    def identity_accelerate(pipe, prompts):
        calls.append(len(prompts))
        return "nothing patched (test)", 0.0

    result = _demo.run_demo(out_dir=tmp_path, device="cpu", steps=2, accelerate=identity_accelerate)
    assert calls == [20]
    assert result["png"].is_file() and result["png"].stat().st_size > 0
    fp, same = result["rows"]
    assert same["psnr"] == pytest.approx(100.0) and same["ssim"] == pytest.approx(1.0)
    assert math.isclose(fp["weight_mb"], same["weight_mb"])


def test_demo_accelerate_reports_missing_api(monkeypatch):
    import sys

    import diffaccel
    from diffaccel import _demo

    # a build without the calibration package: the lazy `diffaccel.calibrate` cannot be imported
    monkeypatch.delattr(diffaccel, "calibrate", raising=False)
    monkeypatch.setitem(sys.modules, "diffaccel.quant.calibrate", None)
    with pytest.raises(RuntimeError, match="diffaccel.calibrate / diffaccel.patch are not available"):
        _demo._accelerate(object(), ["a handwritten digit one"])


def test_demo_warns_when_gpu_kernels_are_missing(monkeypatch):
    """`python -m diffaccel demo` from the repository root imports the source folder, which has no
    _C and no diffaccel.kernels: on a GPU every patched op would run its torch reference and the
    demo printed its figures as diffaccel's without a word."""
    import torch

    from diffaccel import _demo
    from diffaccel.ops import _backend

    monkeypatch.setattr(_backend, "extension_error", lambda: "diffaccel._C not importable: no module")
    monkeypatch.setattr(_backend, "triton_error", lambda: None)
    msg = _demo.missing_kernels_warning(torch.device("cuda"))
    assert msg.startswith("warning: diffaccel._C not importable: no module. The patched pipeline will run torch "
                          "references") and "cd /tmp && python -m diffaccel demo" in msg
    assert _demo.missing_kernels_warning(torch.device("cpu")) is None  # (CPU runs the references anyway)
    monkeypatch.setattr(_backend, "extension_error", lambda: None)
    assert _demo.missing_kernels_warning(torch.device("cuda")) is None
    monkeypatch.setattr(_backend, "triton_error", lambda: "diffaccel.kernels not importable: x")
    assert "diffaccel.kernels not importable: x" in _demo.missing_kernels_warning(torch.device("cuda"))
