"""Where pipeline stages run: `local` (in-process Ray) and `kuberay` (one RayJob per stage)."""
