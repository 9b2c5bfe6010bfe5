"""Public entry points, one module per op: schema (torch.library), fake, autograd, dispatch."""
