"""ModelRunner._upload: the step's index arrays reach the device intact and 16-byte aligned."""

import numpy as np
import torch

from engine.runner import ModelRunner


def uploader() -> ModelRunner:
    # Only the device is read by _upload; the rest of a runner needs a model.
    runner = ModelRunner.__new__(ModelRunner)
    runner.device = torch.device("cpu")
    return runner


def test_pieces_keep_their_values_and_none_stays_none():
    i64, i32 = uploader()._upload(
        [np.arange(3), None, np.array([7, 8, 9, 10, 11])],
        [np.array([0, 5], dtype=np.int32), np.arange(6, dtype=np.int32).reshape(2, 3)],
    )
    assert [None if t is None else t.tolist() for t in i64] == [[0, 1, 2], None, [7, 8, 9, 10, 11]]
    assert [t.tolist() for t in i32] == [[0, 5], [0, 1, 2, 3, 4, 5]]
    assert i64[0].dtype == torch.int64 and i32[0].dtype == torch.int32


def test_every_piece_starts_16_byte_aligned_whatever_the_lengths():
    # Lengths that would put later pieces at 4- and 8-byte offsets if packed tightly.
    for lengths in ([1, 2, 3], [3, 5, 1], [7, 1, 9]):
        i64, i32 = uploader()._upload(
            [np.ones(n) for n in lengths], [np.ones(n, dtype=np.int32) for n in lengths]
        )
        for piece, n in zip(i64 + i32, lengths + lengths):
            assert piece.data_ptr() % 16 == 0
            assert piece.numel() == n and piece.is_contiguous()


def test_an_empty_array_gets_an_empty_piece():
    i64, _ = uploader()._upload([np.array([], dtype=np.int64), np.arange(2)], [np.arange(1, dtype=np.int32)])
    assert i64[0].numel() == 0 and i64[1].tolist() == [0, 1]
