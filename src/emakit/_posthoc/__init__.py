"""_posthoc"""
