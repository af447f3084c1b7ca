"""Parameters and sown values of quantization points visited twice.

LoRAP re-quantizes the prompted aggregate on the aggregate's own quantizer,
so a learned quantizer (A2Q, MixQ) is called twice in one forward pass: the
second call must reuse its parameters and not count its cost again.
"""

import flax.linen as nn


def shared_param(module: nn.Module, name: str, init, *init_args):
  """`module.param`, or the existing parameter when the point is revisited.

  LoRAP re-quantizes on the aggregate's own quantizer: the second visit
  must reuse its parameters, not declare them again.
  """
  if module.has_variable("params", name):
    return module.get_variable("params", name)
  return module.param(name, init, *init_args)


def sow_once(module: nn.Module, collection: str, name: str, value) -> None:
  """Sows `value` unless this point already did in this call."""
  if not module.has_variable(collection, name):
    module.sow(collection, name, value)
