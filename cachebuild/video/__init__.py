"""Video: clips (extraction, frame rules, fps), their headers, and decoding them in the decode workers."""
