"""Peak memory during a block of work, shared by the benchmarks: the CUDA allocator's peak on a GPU,
else the process's resident memory sampled every 2 ms (weights included) and its rise over the start."""

import threading
import time


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or sampled resident memory on the CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            import psutil

            self._process = psutil.Process()
            self.before = self._process.memory_info().rss
            self._peak, self._running = self.before, True
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self):
        while self._running:
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
            self.peak = self._peak
        self.rise = self.peak - self.before
