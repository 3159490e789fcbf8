"""eomt's Hydra launcher plugins, `hydra/launcher=slurm` and `hydra/launcher=local` (Hydra loads launchers only
from the hydra_plugins package)."""
