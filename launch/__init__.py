"""Launchers for `diffjax train`: Cloud TPU (launch.tpu), multi-node GPU (launch.gpu,
launch/slurm.sbatch) and N local CPU processes (launch/local.py)."""
