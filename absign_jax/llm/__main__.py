from absign_jax.llm.finetune import main

main()
