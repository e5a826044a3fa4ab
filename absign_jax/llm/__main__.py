import sys

import absign_jax

# Before any work: a restart under the allocator that keeps freed memory mapped.
absign_jax.allocator.configure_process()

if sys.argv[1:2] == ["export"]:
  from absign_jax.llm.export import main as export_main

  export_main(sys.argv[2:])
else:
  from absign_jax.llm.finetune import main

  main()
