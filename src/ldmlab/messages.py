"""One-line error messages given in more than one place (the config check and the callback that meets the case)."""

EMA_UNDER_FSDP = ("callbacks.ema with trainer=fsdp on {where} ranks: each rank's EMA would hold only its parameter "
                  "shard and checkpoints only rank 0's; use trainer=ddp (SD1.5 with AdamW and EMA fits one 80 GB "
                  "GPU) or callbacks.ema=null")
