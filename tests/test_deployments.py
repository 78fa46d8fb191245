"""prefect.yaml (work pools: `prefect deploy --all`) declares every deployment `lensmith schedule` serves, with the
same entrypoint, schedule, parameters and concurrency limit, so the two ways of scheduling Lensmith cannot drift."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.deployments import deployments
from lensmith.params import Params

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_declares_what_schedule_serves() -> None:
    served = deployments(Params(), ROOT)
    in_yaml = declared()
    assert {d.name for d in served} == set(in_yaml)
    for deployment in served:
        entry = in_yaml[deployment.name]
        assert deployment.entrypoint.endswith(entry["entrypoint"].split("/")[-1])  # module file and flow function
        schedule = deployment.schedules[0].schedule
        assert (entry["schedules"][0]["cron"], entry["schedules"][0]["timezone"]) == (schedule.cron, schedule.timezone)
        assert set(entry["parameters"]) == set(deployment.parameters)
        assert entry["concurrency_limit"] == deployment.concurrency_limit == 1  # never two runs of one at once
        assert set(entry["tags"]) == set(deployment.tags)
