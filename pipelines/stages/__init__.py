"""One file per pipeline stage, named as the stage; `pipelines.stage_table` lists them in order."""
