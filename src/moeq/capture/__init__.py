"""The sequential block loop and the statistics it accumulates (Hessians, token counts)."""
