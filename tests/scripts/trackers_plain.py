"""A hand-written loop that logs every step's loss to experiment trackers through jobwrap.trackers
(tests/test_trackers.py). The tracker writes under --out: TensorBoard's folder, W&B's offline run files
(WANDB_MODE=offline), MLflow's file store (MLFLOW_TRACKING_URI)."""
from __future__ import annotations

import argparse
import os

import torch

import jobwrap
import jobwrap.trackers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trackers", required=True, help="comma-separated: tensorboard, wandb, mlflow")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with jobwrap.Session() as job:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        job.track(model=model, optimizer=optimizer)
        logs = []
        trackers = args.trackers.split(",")
        if "tensorboard" in trackers:
            writer = jobwrap.trackers.tensorboard_writer(job, os.path.join(args.out, "tb"))
            logs.append(lambda value, step: writer.add_scalar("loss", value, step))
        if "wandb" in trackers:
            run = jobwrap.trackers.wandb_init(job, project="jobwrap-test", dir=args.out)
            logs.append(lambda value, step: run.log({"loss": value}, step=step))
        if "mlflow" in trackers:
            import mlflow

            jobwrap.trackers.mlflow_run(job, experiment_name="jobwrap-test")
            logs.append(lambda value, step: mlflow.log_metric("loss", value, step=step))
        for step in job.steps(args.steps):
            x = torch.randn(16, 4)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for log in logs:
                log(loss.item(), step)


if __name__ == "__main__":
    main()
