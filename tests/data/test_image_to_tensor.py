"""partialfc::image_to_tensor (the compiled uint8 BGR -> normalized float RGB conversion) against numpy.

The reference is written here independently: float32 (x - 127.5) / 127.5 with numpy's division, channels
reversed, columns reversed for the mirror. Equality is bit for bit.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import partialfc  # noqa: F401  (loads partialfc._C and registers the ops)
from partialfc.data import transforms

op = getattr(torch.ops.partialfc, "image_to_tensor", None)
pytestmark = pytest.mark.skipif(op is None, reason="partialfc._C is not built")


def reference(img_bgr, flip):
    src = img_bgr[:, ::-1] if flip else img_bgr
    rgb = src[:, :, ::-1].astype(np.float32)
    return ((rgb - np.float32(127.5)) / np.float32(127.5)).transpose(2, 0, 1)


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def image(h, w, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return img


@pytest.mark.parametrize("flip", [False, True])
def test_every_byte_value_is_exact(flip):
    # 256 columns x 3 channels: every value in every channel, at every position of an 8/16-pixel block
    img = np.empty((3, 256, 3), np.uint8)
    img[0] = np.arange(256, dtype=np.uint8)[:, None]
    img[1] = np.arange(256, dtype=np.uint8)[::-1, None]
    img[2] = np.roll(np.arange(256, dtype=np.uint8), 37)[:, None] * np.array([1, 1, 1], np.uint8)
    img[2, :, 1] = np.roll(img[2, :, 1], 5)
    out = op(torch.from_numpy(img), flip)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 3, 256)
    np.testing.assert_array_equal(bits(out.numpy()), bits(reference(img, flip)))


@pytest.mark.parametrize("shape", [(112, 112), (1, 1), (3, 7), (5, 8), (4, 15), (2, 16), (7, 33), (112, 113),
                                   (9, 250)])
@pytest.mark.parametrize("flip", [False, True])
def test_sizes_and_mirror_match_numpy(shape, flip):
    img = image(*shape, seed=shape[0] * 1000 + shape[1])
    out = op(torch.from_numpy(img), flip).numpy()
    np.testing.assert_array_equal(bits(out), bits(reference(img, flip)))
    if flip:  # the mirror is the unmirrored result read backwards along the width
        np.testing.assert_array_equal(bits(out), bits(op(torch.from_numpy(img), False).numpy()[:, :, ::-1]))


def test_non_contiguous_input_and_default_flip():
    base = image(40, 60)
    view = torch.from_numpy(base).transpose(0, 1)  # [60, 40, 3], strided
    np.testing.assert_array_equal(bits(op(view).numpy()), bits(reference(base.transpose(1, 0, 2), False)))


def test_output_needs_no_grad():
    with torch.enable_grad():
        assert not op(torch.from_numpy(image(8, 8)), True).requires_grad


def test_empty_image():
    assert tuple(op(torch.zeros((0, 5, 3), dtype=torch.uint8), True).shape) == (3, 0, 5)
    assert tuple(op(torch.zeros((4, 0, 3), dtype=torch.uint8), False).shape) == (3, 4, 0)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros((4, 4, 3), dtype=torch.float32), "image must be uint8"),
    (torch.zeros((4, 4), dtype=torch.uint8), r"image must be \[H, W, 3\]"),
    (torch.zeros((4, 4, 4), dtype=torch.uint8), r"image must be \[H, W, 3\]"),
    (torch.zeros((2, 4, 4, 3), dtype=torch.uint8), r"image must be \[H, W, 3\]"),
])
def test_bad_input_is_refused(bad, message):
    with pytest.raises(RuntimeError, match=message):
        op(bad, False)


def test_out_variant():
    img = image(20, 24)
    out = torch.full((3, 20, 24), float("nan"))
    torch.ops.partialfc.image_to_tensor_out(torch.from_numpy(img), True, out)
    np.testing.assert_array_equal(bits(out.numpy()), bits(reference(img, True)))
    batch = torch.zeros(2, 3, 20, 24)
    torch.ops.partialfc.image_to_tensor_out(torch.from_numpy(img), False, batch[1])  # a slot of a batch
    np.testing.assert_array_equal(bits(batch[1].numpy()), bits(reference(img, False)))
    assert not batch[0].any()
    with pytest.raises(RuntimeError, match=r"out must be \[3, 20, 24\]"):
        torch.ops.partialfc.image_to_tensor_out(torch.from_numpy(img), False, torch.empty(3, 24, 20))
    with pytest.raises(RuntimeError, match="out must be float32"):
        torch.ops.partialfc.image_to_tensor_out(torch.from_numpy(img), False, torch.empty(3, 20, 24, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        torch.ops.partialfc.image_to_tensor_out(torch.from_numpy(img), False, torch.empty(3, 24, 20).transpose(1, 2))


def test_to_tensor_uses_the_op_and_equals_the_numpy_path(monkeypatch):
    assert transforms.compiled_to_tensor() is not None
    img = image(112, 112, seed=3)
    for flip in (False, True):
        fast = transforms.to_tensor(img, flip)
        np.testing.assert_array_equal(bits(fast.numpy()), bits(transforms.to_tensor_numpy(img, flip).numpy()))
        np.testing.assert_array_equal(bits(fast.numpy()), bits(reference(img, flip)))
    # read-only and strided arrays are accepted (copied before torch.from_numpy)
    ro = img.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(transforms.to_tensor(ro, True).numpy(), reference(img, True))
    np.testing.assert_array_equal(transforms.to_tensor(img[:, ::-1], False).numpy(), reference(img, True))
    # other sizes are resized to 112 x 112 first, on both paths
    big = image(150, 130, seed=4)
    fast = transforms.to_tensor(big, True)
    monkeypatch.setattr(transforms, "_image_op", None)
    slow = transforms.to_tensor(big, True)
    assert tuple(fast.shape) == (3, 112, 112)
    np.testing.assert_array_equal(fast.numpy(), slow.numpy())


def test_decode_to_tensor_and_corrupt_message():
    import cv2
    img = image(112, 112, seed=5)
    png = cv2.imencode(".png", img)[1].tobytes()
    np.testing.assert_array_equal(transforms.decode_to_tensor(png, True).numpy(), reference(img, True))
    with pytest.raises(transforms.CorruptImageError, match=r"cannot decode record 7 \(5 bytes\)"):
        transforms.decode_to_tensor(b"junk!", where=lambda: "record 7")


def test_flip_table_equals_flip_bit():
    for seed, epoch in [(0, 0), (7, 3), (2**40 + 1, 2**20)]:
        table = transforms.FlipTable(seed, epoch, 70000)
        idx = list(range(0, 300)) + list(range(65500, 65600)) + [69999, 70000, 123456]  # past size: fallback
        assert [table(i) for i in idx] == [transforms.flip_bit(seed, epoch, i) for i in idx]
        coins = transforms.flip_bits(seed, epoch, 0, 70000)
        assert coins.tolist()[::997] == [transforms.flip_bit(seed, epoch, i) for i in range(0, 70000, 997)]
        assert 0.48 < coins.mean() < 0.52


class _WorkerProbe(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        img = image(112, 112, seed=i)
        return transforms.compiled_to_tensor() is not None, transforms.to_tensor(img, bool(i)), torch.tensor(i)


def test_op_is_used_in_dataloader_workers():
    loader = torch.utils.data.DataLoader(_WorkerProbe(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    for used_op, tensor, i in loader:
        assert used_op
        np.testing.assert_array_equal(tensor.numpy(), reference(image(112, 112, seed=int(i)), bool(i)))


def test_disable_env_selects_numpy():
    code = ("import partialfc; from partialfc.data import transforms; import numpy as np; "
            "print(transforms.compiled_to_tensor() is None, "
            "transforms.to_tensor(np.zeros((112, 112, 3), np.uint8)).shape)")
    env = dict(os.environ, PARTIALFC_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split()[0] == "True" and "torch.Size([3, 112, 112])" in out.stdout


def _decoded_entry():
    from partialfc.ops import extension as _ext
    return getattr(_ext._C, "decoded_image_to_tensor")


@pytest.mark.parametrize("shape", [(112, 112), (1, 1), (5, 8), (7, 33), (0, 4)])
@pytest.mark.parametrize("flip", [False, True])
def test_loader_entry_point_equals_the_op_bit_for_bit(shape, flip):
    fast = _decoded_entry()
    img = image(*shape, seed=shape[0] * 31 + shape[1])
    out = fast(img, flip)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (3,) + shape
    assert out.is_contiguous() and not out.requires_grad
    np.testing.assert_array_equal(bits(out.numpy()), bits(reference(img, flip)))
    np.testing.assert_array_equal(bits(out.numpy()), bits(op(torch.from_numpy(img), flip).numpy()))
    # any buffer-protocol object and any truthy flag work; the input is only read
    before = img.copy()
    np.testing.assert_array_equal(fast(memoryview(img), 1 if flip else 0).numpy(), out.numpy())
    np.testing.assert_array_equal(img, before)


def test_loader_entry_point_rejects_what_the_kernel_cannot_read():
    fast = _decoded_entry()
    img = image(6, 10)
    with pytest.raises(TypeError, match="must be uint8"):
        fast(img.astype(np.float32), False)
    with pytest.raises(ValueError, match=r"must be \[H, W, 3\].*got 2 dimensions"):
        fast(img[:, :, 0].copy(), False)
    with pytest.raises(ValueError, match=r"must be \[H, W, 3\]"):
        fast(np.zeros((6, 10, 4), np.uint8), False)
    with pytest.raises(ValueError, match="C-contiguous"):
        fast(img[:, ::-1], False)
    with pytest.raises(TypeError):
        fast("not an image", False)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        fast(img)
    ro = img.copy()
    ro.flags.writeable = False  # read-only input is fine
    np.testing.assert_array_equal(fast(ro, True).numpy(), reference(img, True))


def test_datasets_per_sample_path_uses_the_entry_point(monkeypatch):
    transforms.compiled_to_tensor()
    assert transforms._decoded_op is _decoded_entry()
    calls = []
    monkeypatch.setattr(transforms, "_decoded_op", lambda img, flip: calls.append(flip) or "converted")
    assert transforms.decoded_to_tensor(image(112, 112), True) == "converted" and calls == [True]
    # other sizes take the resizing path
    assert tuple(transforms.decoded_to_tensor(image(50, 60), False).shape) == (3, 112, 112) and calls == [True]
