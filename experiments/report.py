"""What every benchmark writes around its figures: the machine, the provenance line, and the
replacement of its own marked section of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import statistics
import time


def machine() -> str:
    """CPU model and cores, accelerator devices, jax and Python versions, in one line."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    return (f"{cpu}, {os.cpu_count()} cores, {len(devices)} x {kind} ({jax.default_backend()}), "
            f"jax {jax.__version__}, Python {platform.python_version()}")


def provenance(command: str) -> str:
    """`command` — machine — UTC date."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"`{command}` — {machine()} — {date}"


def write_section(path: pathlib.Path, name: str, body: str) -> None:
    """Replaces the section between `<!-- begin NAME -->` and `<!-- end NAME -->` markers of
    `path` (appended if missing; the file is created if needed)."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Median float32 FLOP/s of an n x n x n matmul: this machine's practical peak."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)
