"""Launch templates: `slurm.sbatch` (srun + torchrun, c10d rendezvous). See docs/distributed.md."""
