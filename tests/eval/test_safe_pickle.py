"""The restricted unpickler: real .bin layouts load, anything that could run code is refused."""
import os
import pickle
import struct

import cv2
import numpy as np
import pytest

from partialfc.eval import BinFormatError, UnsafePickleError, load_bin, safe_load


def _jpegs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".png", img)  # lossless, so decoded pixels are checkable
        assert ok
        out.append((img, buf.tobytes()))
    return out


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(([b"x", b"y"], [_SystemCall(marker)]))
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError) as err:
        load_bin(path)
    msg = str(err.value)
    assert str(path) in msg and "system" in msg and ("posix" in msg or "os" in msg)
    assert not marker.exists()

    # The same bytes through the ordinary unpickler do run the command, so the refusal above matters.
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize("reducer", [
    (eval, ("1+1",)),
    (getattr, ("text", "upper")),
    (__import__, ("os",)),
])
def test_other_dangerous_globals_are_refused(tmp_path, reducer):
    class Evil:
        def __reduce__(self):
            return reducer

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((Evil(), [True])))
    with pytest.raises(UnsafePickleError, match="refused to load global 'builtins."):
        load_bin(path)


def test_codecs_encode_only_admits_latin1():
    # protocol-2 pickles of bytes use _codecs.encode(text, 'latin1'); that round trip is admitted ...
    assert safe_load(pickle.dumps(b"\x00\xff\x10", protocol=2)) == b"\x00\xff\x10"
    # ... but no other codec (codec lookups can import modules).
    forged = b"\x80\x02c_codecs\nencode\nq\x00X\x02\x00\x00\x00abq\x01X\x05\x00\x00\x00rot13q\x02\x86q\x03Rq\x04."
    with pytest.raises(UnsafePickleError, match="latin1"):
        safe_load(forged)


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_both_layouts_load_at_every_protocol(tmp_path, protocol):
    pairs = _jpegs(4)
    truth = np.stack([cv2.cvtColor(img, cv2.COLOR_BGR2RGB) for img, _ in pairs])
    issame = [True, False]
    layouts = {
        "bytes": ([b for _, b in pairs], issame),
        "numpy_encoded": ([np.frombuffer(b, np.uint8) for _, b in pairs], np.array(issame)),
        "numpy_decoded": (list(truth), [np.bool_(v) for v in issame]),
        "numpy_stacked": (truth.copy(), issame),
    }
    for name, obj in layouts.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        images, flags = load_bin(path)
        assert images.dtype == np.uint8 and images.shape == (4, 112, 112, 3), name
        np.testing.assert_array_equal(images, truth, err_msg=name)
        np.testing.assert_array_equal(flags, np.array(issame), err_msg=name)


def test_python2_style_pickle_of_str_buffers_loads(tmp_path):
    # insightface's original .bin files were written by Python 2: JPEG bytes as BINSTRING opcodes.
    pairs = _jpegs(2, seed=3)
    body = b"\x80\x02(]q\x00("
    for _, data in pairs:
        body += b"T" + struct.pack("<i", len(data)) + data
    body += b"e]q\x01(\x88et."  # close the image list, then issame = [True], then the tuple
    path = tmp_path / "py2.bin"
    path.write_bytes(body)
    images, flags = load_bin(path)
    np.testing.assert_array_equal(images[1], cv2.cvtColor(pairs[1][0], cv2.COLOR_BGR2RGB))
    assert flags.tolist() == [True]


def test_resizes_to_the_requested_size(tmp_path):
    img = np.full((96, 96, 3), 200, np.uint8)
    data = cv2.imencode(".png", img)[1].tobytes()
    path = tmp_path / "small.bin"
    path.write_bytes(pickle.dumps(([data, data], [False])))
    images, _ = load_bin(path)
    assert images.shape == (2, 112, 112, 3) and (images == 200).all()


def test_layout_errors_name_the_file(tmp_path):
    data = _jpegs(1)[0][1]
    cases = {
        "count.bin": ([data, data, data], [True]),
        "flags.bin": ([data, data], ["yes"]),
        "shape.bin": [data],
        "decode.bin": ([b"not an image", data], [True]),
    }
    for name, obj in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj))
        with pytest.raises(BinFormatError, match=name):
            load_bin(path)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(pickle.dumps(([data, data], [True]))[:-20])
    with pytest.raises(BinFormatError, match="truncated.bin"):
        load_bin(truncated)
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        load_bin(tmp_path / "absent.bin")
