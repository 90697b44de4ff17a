-- Today's upstream fields: forwarded with the create call, kept with the other inputs.
ALTER TABLE task_inputs ADD COLUMN negative_prompt TEXT;
ALTER TABLE task_inputs ADD COLUMN watermark_info TEXT;
-- Units upstream deducted for the task (`final_unit_deduction`, string or number upstream).
ALTER TABLE tasks ADD COLUMN final_unit_deduction TEXT;
