"""Online fine-tuning: learn from the robot's own experience while serving, promote safely.

The serving process (torch-free) assembles transitions per stream (`experience`), pushes them to
the learner process without ever blocking (`manager`), gates candidates (`gates`), judges every
promotion by the returns the robot reports (`monitor`) and reads the versions pointer
(`versions`). Only the learner process (`learner`) imports torch.
"""
