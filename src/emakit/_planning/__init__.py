"""_planning"""
