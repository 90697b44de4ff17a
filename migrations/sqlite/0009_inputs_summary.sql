-- A task's input images are kept only while it is pending (a Base64 image is megabytes): once
-- it is upstream or final, no dispatch can need them. What they were (URL, or Base64 size) stays
-- in `summary`, JSON written at submit.
ALTER TABLE task_inputs ADD COLUMN summary TEXT;
-- The tasks already past pending give their images back now.
UPDATE task_inputs SET subject_images = '[]', scene_image = NULL, style_image = NULL
WHERE task_id IN (SELECT id FROM tasks WHERE status <> 'pending');
