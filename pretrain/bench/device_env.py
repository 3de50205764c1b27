"""The Python environment of a lent GPU machine: what its image holds, what we carry to it as wheels, and whether
the two together satisfy every requirement of the project and of each carried wheel, at the versions we pin.

Two lists in tools/ hold the facts: `gpu_image.txt` (the image's packages: `name==version` where a reading gave
the version, a bare name where only the name was read) and `gpu_wheels.txt` (what tools/gpu_wheels.sh downloads and
builds into .whl/, `name==version`). The closure (`closure_problems`) is checked three times:
- in the test suite, offline: the carried wheels' requirements read from this environment's installed metadata
  (the same versions, pinned by constraints.txt);
- by tools/gpu_wheels.sh, on the wheel files it built;
- on the device, after installing them (`python -m pretrain.bench.device_env --installed`), on the installed
  distributions, with the versions, the DeepSpeed accelerator and the communication backend asserted.
Rule: a requirement is met by a carried wheel or an image package whose version satisfies it. An image package of
unread version meets a requirement of a carried wheel (the check on the device reads the real version), unless the
list records it as older than some version (`name<version`, a fact learned there) that the requirement's floor
reaches; it never meets one of the project's own pins: those are carried unless the image's version equals the pin.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IMAGE_LIST = ROOT / "tools" / "gpu_image.txt"
WHEEL_LIST = ROOT / "tools" / "gpu_wheels.txt"
# The device image's interpreter and platform: requirement markers are evaluated for it.
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path) -> dict[str, str | None]:
    """{canonical name: version or None} from lines `name==version` or `name` (# comments allowed)."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = re.match(r"([A-Za-z0-9_.\-]+)\s*(==|<)?\s*(\S*)", line).groups()
            out[canonical(name)] = (version if sep == "==" else f"<{version}") if sep else None
    return out


# The project's requirements that nothing the device call runs imports (each imported where its command starts), so
# they stay out of the carry (64 MiB a call: pyarrow's wheel alone is ~40 MB).
NOT_ON_DEVICE = {
    "pyarrow": "pretrain shards parquet: shards are built on the CPU box",
    "matplotlib": "pretrain report: drawn wherever the run directory is read",
    "av": "video clips (imported when a sample holds one): the device call's recipes have none",
}


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's requirements that the device call needs (all of them but NOT_ON_DEVICE)."""
    import tomllib  # Python 3.11+: the device's 3.12 and this project's tools
    from packaging.requirements import Requirement

    listed = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [r for r in listed if canonical(Requirement(r).name) not in NOT_ON_DEVICE]


def applies(requirement: Any) -> bool:
    """Whether a requirement holds on the device (its marker, no extras asked for)."""
    return requirement.marker is None or requirement.marker.evaluate(DEVICE_MARKERS)


def closure_problems(own: Iterable[str], carried: Mapping[str, tuple[str, list[str]]],
                     image: Mapping[str, str | None]) -> list[str]:
    """Every unmet requirement, as a sentence. `own`: the project's requirements; `carried`: {canonical name:
    (version, its Requires-Dist lines)}; `image`: {canonical name: version or None}."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    wanted = [(Requirement(r), "the project", True) for r in own]
    wanted += [(Requirement(r), f"{name} {version}", False) for name, (version, reqs) in carried.items()
               for r in reqs]
    for req, by, pinned in wanted:
        if not applies(req):
            continue
        name = canonical(req.name)
        if name in carried:
            version, where = carried[name][0], "carried"
        elif name in image:
            version, where = image[name], "in the image"
        else:
            problems.append(f"{req} (required by {by}) is neither carried nor in the image")
            continue
        if version is None:
            if pinned and req.specifier:
                problems.append(f"{req} (pinned by the project) is in the image at an unread version: carry it")
            continue
        if version.startswith("<"):  # unread, but known to be older than this
            floors = [s.version for s in req.specifier if s.operator in (">=", ">", "==", "~=")]
            if any(Version(f) >= Version(version[1:]) for f in floors):
                problems.append(f"{req} (required by {by}) but the image's {name} is older than {version[1:]}")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} (required by {by}) but {name} {version} is {where}")
    return problems


def venv_carried(wheels: Mapping[str, str | None]) -> dict[str, tuple[str, list[str]]]:
    """The carried set's metadata from this environment's installed distributions, each at the listed version."""
    out = {}
    for name, version in wheels.items():
        dist = metadata.distribution(name)
        if version is not None and dist.version != version:
            raise RuntimeError(f"{name}: the wheel list says {version}, this environment has {dist.version}")
        out[name] = (dist.version, list(dist.requires or []))
    return out


def wheel_carried(folder: Path) -> dict[str, tuple[str, list[str]]]:
    """The carried set's metadata read from the wheel files in `folder`."""
    import zipfile
    from email.parser import Parser

    out = {}
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            msg = Parser().parsestr(z.read(meta).decode())
        name = canonical(msg["Name"])
        if name in out:
            raise RuntimeError(f"two wheels of {name} in {folder}: pip would stop the install")
        out[name] = (msg["Version"], msg.get_all("Requires-Dist") or [])
    return out


def installed_check(wheels: Mapping[str, str | None], expect_device: str) -> dict[str, Any]:
    """On the device after the install: every carried package imports at the listed version, the closure holds over
    the installed distributions, DeepSpeed's accelerator is `expect_device`, the collective backend is there."""
    import torch

    versions = {name: metadata.version(name) for name in wheels}
    wrong = {n: v for n, v in versions.items() if wheels[n] is not None and v != wheels[n]}
    installed: dict[str, str | None] = {}
    for d in metadata.distributions():  # in sys.path order: the carried copy shadows the image's
        installed.setdefault(canonical(d.metadata["Name"]), d.version)
    carried = {n: (versions[n], list(metadata.distribution(n).requires or [])) for n in wheels}
    problems = closure_problems(project_requirements(), carried, installed)
    from deepspeed.accelerator import get_accelerator

    from pretrain.distributed import backends_available

    accelerator = get_accelerator().device_name()
    cuda = expect_device == "cuda"
    backend = backends_available()
    nccl_version = ".".join(map(str, torch.cuda.nccl.version())) if cuda and backend["nccl"] else None
    ok = not wrong and not problems and accelerator == expect_device and backend["nccl" if cuda else "gloo"]
    return {"ok": ok, "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, **versions},
            "wrong_versions": wrong, "closure_problems": problems, "deepspeed_accelerator": accelerator,
            "backends": backend, "nccl": nccl_version,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.bench.device_env", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--wheels", type=Path, help="check the wheel files in this folder against the image list")
    what.add_argument("--venv", action="store_true", help="check the wheel list with this environment's metadata")
    what.add_argument("--installed", choices=["cuda", "cpu"], help="on the device: the installed environment")
    p.add_argument("--out", type=Path, help="write the result as JSON")
    args = p.parse_args(argv)
    listed = read_list(WHEEL_LIST)
    if args.installed:
        result = installed_check(listed, args.installed)
    else:
        carried = wheel_carried(args.wheels) if args.wheels else venv_carried(listed)
        missing = sorted(set(listed) - set(carried))
        problems = closure_problems(project_requirements(), carried, read_list(IMAGE_LIST))
        problems += [f"{name} is listed in {WHEEL_LIST.name} but not carried" for name in missing]
        result = {"ok": not problems, "carried": {n: v for n, (v, _) in carried.items()}, "closure_problems": problems}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
