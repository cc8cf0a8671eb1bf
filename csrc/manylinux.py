"""Link fastbert._C on a new Linux so that it loads on an old one: the manylinux_2_28 floor
(glibc 2.28, the libstdc++ of GCC 8), the platform tag torch's own wheels carry.

A shared object asks the dynamic loader for each imported symbol at a version: the default
version in the libraries it was linked against. On this machine (glibc 2.36, GCC 12) that
makes the module need glibc 2.34 and GLIBCXX 3.4.29, so auditwheel could only tag it
manylinux_2_34 and it would not load on RHEL/Rocky 8 or Ubuntu 20.04. The culprits:

* the static CUDA runtime calls pthread_*, sem_*, shm_* and dl*: glibc 2.34 moved those from
  libpthread/librt/libdl into libc under a new version, keeping the old ones as compatibility
  aliases. We link against small stub libraries whose only content is those symbols at the
  old versions, named libpthread.so.0 / librt.so.1 / libdl.so.2 as in glibc 2.28: the module then asks
  for `pthread_once@GLIBC_2.2.5` from libpthread.so.0, which every glibc since 2.2.5 answers
  (2.34+ from libc's compatibility alias, the way every binary built before 2.34 still runs).
  A symbol's old version is read from this machine's libc, so it is the real one.
* GCC 12's headers call three libstdc++ functions newer than GCC 8's library
  (std::__throw_bad_array_new_length, exception_ptr::_M_addref/_M_release): we link the
  archive members that define them (libstdc++.a's functexcept.o, eh_ptr.o) into the module,
  the way GCC toolsets of manylinux images link their libstdc++_nonshared.a; everything
  else still comes from the system's libstdc++.so.6.
* GCC 12's libstdc++ headers read glibc 2.32's `__libc_single_threaded` to skip atomic
  reference counts in a single-threaded process. The module gets its own copy, always 0
  ("not known to be single-threaded"): the atomic path, correct everywhere.

A version script exports only PyInit__C, so none of the above (nor the static CUDA runtime,
nor template instantiations) is visible to, or can interpose on, other libraries.

`portable_link(link_cmd, out, target)` runs after the normal link and relinks with these
pieces until nothing newer than the target is asked for, or raises naming what is left;
csrc/build_ext.py calls it when FASTBERT_MANYLINUX is set (scripts/build_wheels.py sets it).
`python csrc/manylinux.py check MODULE.so [2_28]` lists what a module asks for beyond a target.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The newest symbol version a target's libraries provide (auditwheel's manylinux policy, x86_64).
TARGETS = {
    "2_28": {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)},
    "2_17": {"GLIBC": (2, 17), "GLIBCXX": (3, 4, 19), "CXXABI": (1, 3, 7), "GCC": (4, 8, 0)},
}
# Where glibc 2.28 kept what later moved into libc (stub libraries get these sonames).
_OLD_HOME = [(re.compile(r"^(pthread_|sem_)"), "libpthread.so.0"), (re.compile(r"^dl[a-z]"), "libdl.so.2"),
             (re.compile(r"^(shm_|mq_|timer_|aio_|lio_)"), "librt.so.1")]
_SINGLE_THREADED = "__libc_single_threaded"
EXPORTS = ["PyInit__C"]


def _version_key(version: str) -> tuple[str, tuple[int, ...]] | None:
    """('GLIBC', (2, 34)) from 'GLIBC_2.34'; None for versions without numbers (GLIBC_PRIVATE)."""
    m = re.fullmatch(r"([A-Z]+)_(\d+(?:\.\d+)*)", version)
    return (m.group(1), tuple(int(x) for x in m.group(2).split("."))) if m else None


def _dynamic_symbols(path: Path) -> list[tuple[str, str, str, bool]]:
    """(name, version, kind 'F'/'O'/'', undefined) for each versioned dynamic symbol of `path`
    (objdump -T; a compatibility alias shows its version in parentheses)."""
    done = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"objdump -T {path} failed: {done.stderr.strip()}")
    rows = []
    for line in done.stdout.splitlines():
        m = re.match(r"^[0-9a-f]+ (.{7}) (\S+)\s+[0-9a-f]+\s+\(?([A-Za-z_]+[\d.]*)\)?\s+(\S+)$", line)
        if m:
            flags, section, version, name = m.groups()
            kind = "F" if "F" in flags else "O" if "O" in flags else ""
            rows.append((name, version, kind, section == "*UND*"))
    return rows


def too_new(module: Path, target: str) -> list[tuple[str, str, str]]:
    """(name, version, kind) of the symbols `module` imports at a version newer than `target`'s."""
    limits = TARGETS[target]
    out = []
    for name, version, kind, undefined in _dynamic_symbols(module):
        key = _version_key(version)
        if undefined and key is not None and key[0] in limits and key[1] > limits[key[0]]:
            out.append((name, version, kind))
    return sorted(set(out))


def _compiler_file(name: str) -> Path:
    found = subprocess.run(["gcc", "-print-file-name=" + name], capture_output=True, text=True).stdout.strip()
    if not found or not Path(found).is_absolute() or not Path(found).exists():
        raise RuntimeError(f"the manylinux link needs {name} from the C/C++ toolchain and gcc cannot find it "
                           "(on Fedora/RHEL: the libstdc++-static package)")
    return Path(found)


def _archive_table(archive: Path) -> tuple[dict[str, str], dict[str, set[str]]]:
    """(symbol -> the member defining it, member -> the symbols it leaves undefined) of an archive."""
    done = subprocess.run(["nm", "-A", str(archive)], capture_output=True, text=True)
    defined, undefined = {}, {}
    for line in done.stdout.splitlines():
        m = re.match(r"^.*?:([^:]+\.o):\s*[0-9a-f]* ([A-Za-z]) (\S+)$", line)
        if not m:
            continue
        member, kind, name = m.groups()
        if kind == "U":
            undefined.setdefault(member, set()).add(name)
        elif kind in "TDBRWVuGSC":  # global definitions; lowercase ones are private to the member
            defined.setdefault(name, member)
    return defined, undefined


def _libstdcxx_members(names: set[str], limits) -> set[str]:
    """The members of libstdc++.a to link in for `names`: those defining them, and, closing over
    what those leave undefined, those defining what libstdc++.so.6 does not export at a version
    within `limits` (internal helpers such as __gnu_cxx::__snprintf_lite)."""
    archive = _compiler_file("libstdc++.a")
    defined, undefined = _archive_table(archive)
    exported = {}
    for name, version, _, is_undefined in _dynamic_symbols(_compiler_file("libstdc++.so.6").resolve()):
        key = _version_key(version)
        if not is_undefined and key is not None and key[0] in limits and key[1] <= limits[key[0]]:
            exported[name] = version
    missing = sorted(n for n in names if n not in defined)
    if missing:
        raise RuntimeError(f"libstdc++.a defines none of {missing}")
    members, todo = set(), [defined[n] for n in names]
    while todo:
        member = todo.pop()
        if member in members:
            continue
        members.add(member)
        for name in undefined.get(member, ()):
            if name not in exported and name in defined:
                todo.append(defined[name])
    return members


def _old_version(name: str, limit: tuple[int, ...], libc_symbols) -> str | None:
    """The newest version of glibc's `name` not newer than `limit`, as this machine's libc
    defines it (default or compatibility alias)."""
    versions = [v for n, v, _, undefined in libc_symbols if n == name and not undefined]
    keyed = [(_version_key(v), v) for v in versions]
    usable = [(k[1], v) for k, v in keyed if k is not None and k[0] == "GLIBC" and k[1] <= limit]
    return max(usable)[1] if usable else None


def _old_home(name: str) -> str:
    for pattern, soname in _OLD_HOME:
        if pattern.match(name):
            return soname
    return "libc.so.6"


def _build_stubs(symbols: dict[str, tuple[str, str]], work: Path) -> list[Path]:
    """One stub shared library per old home: `symbols` maps name -> (version, kind). The stubs
    exist only to be linked against; the loader never opens them (their sonames are glibc's)."""
    by_lib: dict[str, dict[str, tuple[str, str]]] = {}
    for name, (version, kind) in symbols.items():
        soname = _old_home(name)
        if soname == "libc.so.6":
            raise RuntimeError(f"glibc symbol {name}@{version} has no stub library (it never left libc)")
        by_lib.setdefault(soname, {})[name] = (version, kind)
    stubs = []
    for soname, entries in sorted(by_lib.items()):
        stem = soname.split(".so")[0]
        source = work / f"{stem}_stub.c"
        source.write_text("".join(f"char {n};\n" if kind == "O" else f"void {n}(void) {{}}\n"
                                  for n, (_, kind) in sorted(entries.items())))
        versions = sorted({v for v, _ in entries.values()}, key=lambda v: _version_key(v)[1])
        script, previous = [], None
        for version in versions:
            names = " ".join(f"{n};" for n, (v, _) in sorted(entries.items()) if v == version)
            script.append(f"{version} {{ global: {names} }}" + (f" {previous};" if previous else ";"))
            previous = version
        (work / f"{stem}.map").write_text("\n".join(script) + "\n")
        stub_dir = work / stem
        stub_dir.mkdir(exist_ok=True)
        stub = stub_dir / soname
        _run(["gcc", "-shared", "-nostdlib", "-fPIC", "-o", str(stub), str(source),
              f"-Wl,-soname,{soname}", f"-Wl,--version-script={work / f'{stem}.map'}"])
        stubs.append(stub)
    return stubs


def _run(cmd, cwd=None):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done


def portable_link(link_cmd: list[str], out: Path, target: str = "2_28") -> list[str]:
    """Relink `out` (built by `link_cmd`, an nvcc or g++ -shared command) so it imports nothing
    newer than manylinux `target`; the names of what was added to the link line. RuntimeError
    when that is not possible (a symbol with no old version, a missing toolchain file)."""
    if target not in TARGETS:
        raise ValueError(f"FASTBERT_MANYLINUX={target!r}: expected one of {sorted(TARGETS)}")
    for tool in ("gcc", "objdump", "nm", "ar"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"the manylinux link needs `{tool}` on PATH")
    with tempfile.TemporaryDirectory(prefix="fastbert-manylinux-") as tmp:
        return _relink(link_cmd, out, target, Path(tmp))


def _relink(link_cmd, out: Path, target: str, work: Path) -> list[str]:
    limits = TARGETS[target]
    libc_symbols = _dynamic_symbols(_libc_path())
    exports = work / "exports.map"
    exports.write_text("{ global: " + " ".join(f"{e};" for e in EXPORTS) + " local: *; };\n")
    members: set[str] = set()
    glibc: dict[str, tuple[str, str]] = {}
    single_threaded = False
    extra: list[str] = []
    for _ in range(4):  # a pulled-in member may ask for more; a few rounds settle it
        left = too_new(out, target)
        if not left and extra:
            return [Path(arg).name for arg in extra if arg != "-Xlinker"]
        cxx = {n for n, v, _ in left if v.split("_")[0] in ("GLIBCXX", "CXXABI")}
        unresolved = []
        for name, version, kind in left:
            family = _version_key(version)[0]
            if family == "GLIBC" and name == _SINGLE_THREADED:
                single_threaded = True
            elif family == "GLIBC":
                old = _old_version(name, limits["GLIBC"], libc_symbols)
                if old is None:
                    unresolved.append(f"{name}@{version}")
                else:
                    glibc[name] = (old, kind)
            elif family not in ("GLIBCXX", "CXXABI"):
                unresolved.append(f"{name}@{version}")
        if unresolved:
            raise RuntimeError(f"{out.name} imports symbols newer than manylinux_{target} that cannot be "
                               f"linked in or pinned to an older version: {unresolved}")
        if cxx:
            members |= _libstdcxx_members(cxx, limits)
        extra = []
        if members:
            _run(["ar", "x", _compiler_file("libstdc++.a"), *sorted(members)], cwd=work)
            extra += [str(work / m) for m in sorted(members)]
        if single_threaded:
            source = work / "single_threaded.c"
            source.write_text(f"char {_SINGLE_THREADED} = 0;\n")
            _run(["gcc", "-c", "-fPIC", "-o", str(work / "single_threaded.o"), str(source)])
            extra.append(str(work / "single_threaded.o"))
        # The stubs after every object that calls into them and before the C library (which
        # the compiler driver adds last): ld binds a call to the first library defining it
        # that comes after the caller. By path, through -Xlinker: nvcc takes no .so.0 input.
        if glibc:
            extra += [arg for stub in _build_stubs(glibc, work) for arg in ("-Xlinker", str(stub))]
        extra += ["-Xlinker", f"--version-script={exports}"]
        _run(link_cmd + extra)
    left = too_new(out, target)
    if left:
        raise RuntimeError(f"{out.name} still imports symbols newer than manylinux_{target}: {left}")
    return [Path(arg).name for arg in extra if arg != "-Xlinker"]


def _libc_path() -> Path:
    """This machine's real libc.so.6 (gcc names the linker script libc.so; the loader knows the file)."""
    done = subprocess.run(["ldd", sys.executable], capture_output=True, text=True)
    m = re.search(r"libc\.so\.6 => (\S+)", done.stdout)
    if not m:
        raise RuntimeError("cannot find this machine's libc.so.6 (ldd of the Python interpreter names none)")
    return Path(m.group(1)).resolve()


def _main(argv) -> int:
    if len(argv) not in (2, 3) or argv[0] != "check":
        print("usage: python csrc/manylinux.py check MODULE.so [2_28|2_17]", file=sys.stderr)
        return 2
    target = argv[2] if len(argv) == 3 else "2_28"
    left = too_new(Path(argv[1]), target)
    for name, version, _ in left:
        print(f"{name}@{version}")
    print(f"{len(left)} symbols newer than manylinux_{target}", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
