"""Git and DVC remote operations for the nightly flow (subprocess: the same commands a person types)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from lensmith.errors import LensmithError
from tasks.dvc_runner import dvc_command, tool_env


class RemoteError(LensmithError):
    """The DVC remote (S3) could not be reached or refused the operation."""


@dataclass(frozen=True)
class RemoteResult:
    ran: bool
    detail: str


def default_remote(root: Path) -> str | None:
    proc = dvc_command(root, "remote", "default")
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def dvc_transfer(root: Path, verb: str, *targets: str, timeout_s: float = 3600) -> RemoteResult:
    """`dvc push` / `dvc pull` against the default remote; a clear RemoteError when it fails."""
    remote = default_remote(root)
    if remote is None:
        return RemoteResult(False, "no default DVC remote configured; skipped")
    proc = dvc_command(root, verb, "--remote", remote, *targets, timeout_s=timeout_s)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        if verb == "pull" and "missing" in output.lower() and "unexpected error" not in output.lower():
            return RemoteResult(True, "pulled what the remote has (some outputs not pushed yet): " + _last(output))
        raise RemoteError(f"dvc {verb} to remote {remote!r} failed: {_last(output, 6)}")
    return RemoteResult(True, _last(output))


def dvc_status_clean(root: Path) -> bool:
    """True when every stage of dvc.yaml is up to date (nothing for `dvc repro` to do)."""
    proc = dvc_command(root, "status", "--json")
    return proc.returncode == 0 and proc.stdout.strip() in ("{}", "")


def git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, env=tool_env(), capture_output=True, text=True, check=False)


def git_commit_run(root: Path, paths: list[str], message: str, tag: str | None) -> str | None:
    """Commit the run's record (dvc.lock, params, metrics, registry pointers); return the commit sha."""
    existing = [p for p in paths if (root / p).exists()]
    if not existing:
        return None
    add = git(root, "add", "--", *existing)
    if add.returncode != 0:
        raise LensmithError(f"git add failed: {add.stderr.strip()}")
    if git(root, "diff", "--cached", "--quiet").returncode == 0 and tag is None:
        return git(root, "rev-parse", "HEAD").stdout.strip() or None
    commit = git(root, "-c", "user.name=lensmith-nightly", "-c", "user.email=nightly@lensmith.local",
                 "commit", "--allow-empty", "-m", message)
    if commit.returncode != 0:
        raise LensmithError(f"git commit failed: {commit.stderr.strip() or commit.stdout.strip()}")
    sha = git(root, "rev-parse", "HEAD").stdout.strip()
    if tag:
        tagged = git(root, "tag", "-f", tag, sha)
        if tagged.returncode != 0:
            raise LensmithError(f"git tag failed: {tagged.stderr.strip()}")
    return sha


def _last(text: str, lines: int = 2) -> str:
    return " | ".join(text.splitlines()[-lines:])
