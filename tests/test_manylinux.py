"""csrc/manylinux.py: a module linked here (glibc 2.36, GCC 12) that loads on manylinux_2_28.

The wheel test (tests/test_wheel.py) checks fastbert._C itself; this one checks the relink on a
small library that uses every construct that made fastbert._C need glibc 2.34 and GCC 11+'s
libstdc++ (pthread_once, dlopen/dlsym, shared_ptr reference counts, exception_ptr copies and
rethrow): before, it asks for versions newer than the target; after, none, and it computes
the same answer."""
import ctypes
import importlib.util
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fastbert_manylinux", ROOT / "csrc" / "manylinux.py")
manylinux = importlib.util.module_from_spec(spec)
spec.loader.exec_module(manylinux)

PROBE = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

static pthread_once_t once = PTHREAD_ONCE_INIT;
static int initialised = 0;
static void init() { initialised += 1; }

extern "C" __attribute__((visibility("default"))) int probe(int n) {
    pthread_once(&once, init);
    pthread_once(&once, init);
    auto shared = std::make_shared<std::vector<int>>(n, 1);
    auto copy = shared;
    std::exception_ptr caught;
    try {
        throw std::runtime_error(std::to_string(n));
    } catch (...) {
        caught = std::current_exception();
    }
    std::exception_ptr again = caught;
    int thrown = 0;
    try {
        std::rethrow_exception(again);
    } catch (const std::runtime_error& err) {
        thrown = std::stoi(err.what());
    }
    void* self = dlopen(nullptr, RTLD_NOW);
    int found = self != nullptr && dlsym(self, "malloc") != nullptr;
    return initialised * 1000 + (int)copy->size() + thrown * 10000 + found * 100000;
}
"""
EXPECTED = lambda n: 1000 + n + n * 10000 + 100000  # noqa: E731
ALLOWED_LIBS = {"libc.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libm.so.6", "libstdc++.so.6",
                "libgcc_s.so.1", "ld-linux-x86-64.so.2"}


def _needed(path):
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out))


def _exported(path):
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def _call(path, n):
    """probe(n) in a fresh process (the library holds its own std::terminate: keep it out of pytest's)."""
    code = f"import ctypes; print(ctypes.CDLL({str(path)!r}).probe({n}))"
    done = subprocess.run(["python3", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.fixture(scope="module")
def probe_object(tmp_path_factory):
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("manylinux x86_64 only")
    if any(shutil.which(t) is None for t in ("g++", "gcc", "objdump", "nm", "ar", "readelf")):
        pytest.skip("needs the GNU toolchain (g++, binutils)")
    work = tmp_path_factory.mktemp("probe")
    (work / "probe.cpp").write_text(PROBE)
    subprocess.run(["g++", "-O2", "-fPIC", "-fvisibility=hidden", "-c", "probe.cpp", "-o", "probe.o"], cwd=work,
                   check=True)
    return work / "probe.o"


def test_relinked_probe_asks_for_nothing_newer_than_2_28_and_computes_the_same(probe_object):
    work = probe_object.parent
    link = ["g++", "-shared", "-o", str(work / "libprobe.so"), str(probe_object)]
    subprocess.run(link, check=True)
    before = manylinux.too_new(work / "libprobe.so", "2_28")
    glibc = tuple(int(x) for x in platform.libc_ver()[1].split(".")[:2])
    if glibc >= (2, 34):  # this machine's default versions are newer: the relink has work to do
        assert {name for name, _, _ in before} >= {"pthread_once", "dlopen", "dlsym"}, before
    assert _call(work / "libprobe.so", 7) == EXPECTED(7)

    manylinux.EXPORTS, saved = ["probe"], manylinux.EXPORTS
    try:
        added = manylinux.portable_link(link, work / "libprobe.so", "2_28")
    finally:
        manylinux.EXPORTS = saved
    assert manylinux.too_new(work / "libprobe.so", "2_28") == []
    assert _needed(work / "libprobe.so") <= ALLOWED_LIBS, _needed(work / "libprobe.so")
    assert _exported(work / "libprobe.so") == {"probe"}, "the version script exports the entry point only"
    assert "exports.map" in added
    assert _call(work / "libprobe.so", 7) == EXPECTED(7)
    assert _call(work / "libprobe.so", 3) == EXPECTED(3)


def test_symbol_versions_are_read_from_objdump(probe_object):
    """too_new parses objdump -T: every versioned import newer than the target, none older."""
    work = probe_object.parent
    subprocess.run(["g++", "-shared", "-o", str(work / "plain.so"), str(probe_object)], check=True)
    rows = manylinux._dynamic_symbols(work / "plain.so")
    assert any(name == "probe" and kind == "F" and not undefined for name, _, kind, undefined in rows)
    imports = {(name, version) for name, version, _, undefined in rows if undefined}
    assert any(name == "pthread_once" and version.startswith("GLIBC_") for name, version in imports)
    newer = manylinux.too_new(work / "plain.so", "2_17")
    assert set(manylinux.too_new(work / "plain.so", "2_28")) <= set(newer)
    assert manylinux._version_key("GLIBC_2.34") == ("GLIBC", (2, 34))
    assert manylinux._version_key("GLIBC_PRIVATE") is None


def test_unknown_target_is_refused(tmp_path):
    with pytest.raises(ValueError, match="FASTBERT_MANYLINUX='2_99'"):
        manylinux.portable_link(["g++", "-shared", "-o", str(tmp_path / "x.so")], tmp_path / "x.so", "2_99")
