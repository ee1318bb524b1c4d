"""Peak anonymous memory of one conversion: ``python convert_memory_worker.py SOURCE INPUT OUTPUT TP``.

Prints JSON ``{"peak_bytes": ..., "baseline_bytes": ...}``: RssAnon (``/proc/self/status``),
sampled every millisecond while the conversion runs, after imports. RssAnon leaves out
file-backed pages, so memory-mapped checkpoint files that the kernel can drop do not count;
tensors copied out of them do.
"""
import json
import sys
import threading
import time

from megakv.checkpoint.convert import convert_checkpoint


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(source: str, input_dir: str, output_dir: str, tp: str) -> None:
    baseline = rss_anon_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    convert_checkpoint(source, input_dir, output_dir, int(tp))
    done.set()
    sampler.join()
    print(json.dumps({"peak_bytes": max(peak, rss_anon_bytes()), "baseline_bytes": baseline}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
