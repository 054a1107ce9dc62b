"""A spy on kto-jax's safetensors reads, for the sliced-loading tests (tests/models/test_shard_read.py
and its two-process worker tests/models/two_process_load.py)."""


class SpyHandle:
    """A safe_open handle that logs (tensor name, bytes) of every read it serves."""

    def __init__(self, handle, log):
        self.handle, self.log = handle, log

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name):
        value = self.handle.get_tensor(name)
        self.log.append((name, value.nbytes))
        return value

    def get_slice(self, name):
        piece, log = self.handle.get_slice(name), self.log

        class Slice:
            get_shape, get_dtype = piece.get_shape, piece.get_dtype

            def __getitem__(self, index):
                value = piece[index]
                log.append((name, value.nbytes))
                return value
        return Slice()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None
